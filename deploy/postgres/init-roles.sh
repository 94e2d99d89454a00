#!/bin/sh
# Run once by the postgres image at the first start of its volume (docker-entrypoint-initdb.d),
# as the bootstrap superuser: the ledger's three login roles and the database's owner (README:
# "Database roles"). `ledger db migrate` then grants each role its privileges. The passwords
# come from the environment and are sent to psql as variables, never echoed.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v owner_pw="$OWNER_PASSWORD" -v writer_pw="$WRITER_PASSWORD" \
    -v reader_pw="$READER_PASSWORD" <<'SQL'
CREATE ROLE ledger_owner LOGIN PASSWORD :'owner_pw';
CREATE ROLE ledger_writer LOGIN PASSWORD :'writer_pw';
CREATE ROLE ledger_reader LOGIN PASSWORD :'reader_pw';
ALTER DATABASE ledger OWNER TO ledger_owner;
SQL
