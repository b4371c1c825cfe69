-- The two databases of a liptune deployment, created once: the postgres image runs the files of
-- /docker-entrypoint-initdb.d only when its data directory is empty (the first start of the
-- `pgdata` volume). Both belong to POSTGRES_USER, the role the services connect as.
--   liptune: the service's own tables (prefixed liptune_, created by `liptune serve`'s
--            alembic migrations) and Optuna's storage (studies, trials, ...).
--   mlflow:  the MLflow tracking server's runs, metrics and model registry.
CREATE DATABASE liptune;
CREATE DATABASE mlflow;
