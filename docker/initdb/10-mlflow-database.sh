#!/bin/sh
# PostgreSQL runs this once, on an empty volume: MLflow's tracking store and its basic-auth user
# store get databases of their own beside the study store's (each keeps an alembic_version
# table, so they cannot share one).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE mlflow OWNER \"$POSTGRES_USER\"" \
  -c "CREATE DATABASE mlflow_auth OWNER \"$POSTGRES_USER\""
