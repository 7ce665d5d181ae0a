-- One PostgreSQL for the team: a database each for MLflow's runs and Prefect's state.
-- Runs once, when the postgres volume is created (docker-entrypoint-initdb.d).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
