-- The Prefect server's database beside FIRST's own (`first`, which holds the API keys: FIRST_KEYS_URL).
CREATE DATABASE prefect OWNER first;
