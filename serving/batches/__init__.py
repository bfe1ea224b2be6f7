"""OpenAI's Files and Batch APIs: uploaded files (``files``), the lines of a batch input file and their checks
(``lines``), batch records shared by the gateway and the ``run-batch`` flow (``store``), and the capability a
flow run uses to send a batch's lines through a gateway as the batch's owner (``tokens``)."""
