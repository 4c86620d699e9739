#!/bin/sh
# Creates one database per Tessera service (TESSERA_DATABASES, space-separated), owned by
# POSTGRES_USER. The postgres image runs this once, when it initialises an empty volume.
set -eu
for database in $TESSERA_DATABASES; do
  echo "creating database $database"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE \"$database\" OWNER \"$POSTGRES_USER\""
done
