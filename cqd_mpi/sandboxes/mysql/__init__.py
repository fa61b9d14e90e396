"""MySQL-compatible servers for the DB task, and one isolated database per item.

Back-ends (`ServerSettings.backend`):
- `external`: a server that already runs (host/port/user/password or a DSN).
- `local`: a throwaway mariadbd or mysqld on a free port with a temp datadir, stopped on close;
  for nodes without a container engine.
- `docker`: a container of a MySQL-compatible image through the docker SDK, as AgentBench does.
  podman's Docker-compatible socket works (env/podman-service.sh); env/mariadb-image.sh builds
  the default image without a registry, env/Dockerfile.mysql builds it from `mysql`.

An `ItemDatabase` is one item's sandbox: a database with a unique name and a dedicated user
whose grants cover that database only (no FILE, PROCESS, SUPER, GRANT OPTION, so no LOAD DATA
INFILE, SHUTDOWN, GRANT, or reading other databases and mysql.*). Each statement runs on a fresh
connection, as AgentBench v0.2 reconnects before each one; the client never enables
CLIENT_MULTI_STATEMENTS or LOCAL INFILE, so multiple statements and client files are refused
by the server. Statements have a time limit set in the session (MariaDB max_statement_time,
MySQL max_execution_time) and backed by a watchdog that kills the connection, since a statement
can lift its own session limit. Results are read row by row and cut at AgentBench's 800
characters, so a huge result is never fetched whole.

A server that cannot be reached is retried with exponential backoff, then `BackendUnavailable`
names the back-end and its address.

Modules: `dsn` (Address, parse_dsn), `client` (pymysql and its errors), `results` (AgentBench's
printed, cut results), `server` (MySQLServer, ExternalServer), `local_server`, `docker_server`,
`settings` (ServerSettings, open_server), `itemdb` (ItemDatabase and its bounds).
"""

from cqd_mpi.sandboxes.mysql.client import (
    CONNECTION_ERRNOS,
    format_error,
    is_connection_error,
    pymysql_module,
)
from cqd_mpi.sandboxes.mysql.docker_server import (
    DEFAULT_IMAGE,
    DOCKER_SERVER_ARGS,
    FEATURE,
    DockerServer,
)
from cqd_mpi.sandboxes.mysql.dsn import Address, parse_dsn
from cqd_mpi.sandboxes.mysql.itemdb import (
    HASH_GROUP_CONCAT_MAX_LEN,
    ITEM_PRIVILEGES,
    ItemDatabase,
    StatementLimits,
    Table,
    quote_identifier,
    unique_name,
)
from cqd_mpi.sandboxes.mysql.local_server import SUPERVISOR, LocalServer, find_server_binary
from cqd_mpi.sandboxes.mysql.results import RESULT_CHARS, TRUNCATED_MARK, read_result, truncate
from cqd_mpi.sandboxes.mysql.server import ExternalServer, MySQLServer
from cqd_mpi.sandboxes.mysql.settings import ServerSettings, open_server

__all__ = [
    "CONNECTION_ERRNOS", "DEFAULT_IMAGE", "DOCKER_SERVER_ARGS", "FEATURE", "HASH_GROUP_CONCAT_MAX_LEN",
    "ITEM_PRIVILEGES", "RESULT_CHARS", "SUPERVISOR", "TRUNCATED_MARK", "Address", "DockerServer",
    "ExternalServer", "ItemDatabase", "LocalServer", "MySQLServer", "ServerSettings", "StatementLimits",
    "Table", "find_server_binary", "format_error", "is_connection_error", "open_server", "parse_dsn",
    "pymysql_module", "quote_identifier", "read_result", "truncate", "unique_name",
]
