"""MySQL servers and per-item databases, against a real server through each back-end.

The external server is CQD_TEST_MYSQL_DSN (default mysql://root@127.0.0.1:3306, the MariaDB
these machines run). The docker test needs podman's socket (env/podman-service.sh) and the
image (env/mariadb-image.sh); it fails, naming what is missing, when they are absent.
"""

import hashlib
import os
import random
import time
from pathlib import Path

import pymysql
import pytest

from cqd_mpi import schema
from cqd_mpi.errors import BackendUnavailable, ConfigError
from cqd_mpi.sandboxes.mysql import (
    DEFAULT_IMAGE,
    TRUNCATED_MARK,
    Address,
    DockerServer,
    ExternalServer,
    ItemDatabase,
    LocalServer,
    ServerSettings,
    StatementLimits,
    Table,
    open_server,
    parse_dsn,
    unique_name,
)

DSN = os.environ.get("CQD_TEST_MYSQL_DSN", "mysql://root@127.0.0.1:3306")
TABLE = Table(name="my table", columns=("id", "name", "note"),
              rows=tuple((str(i), f"name {i}", None if i % 7 == 0 else f"n{i}") for i in range(40)))


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    with ExternalServer(address=parse_dsn(DSN), attempts=3, backoff_s=0.2) as reached:
        reached.ping()
        yield reached


@pytest.fixture
def rank():
    return random.randrange(1000, 10**6)


@pytest.fixture
def item(server, rank):
    db = ItemDatabase.create(server, name=unique_name(rank=rank, item="1"), limits=StatementLimits(statement_seconds=1.0))
    db.load(TABLE)
    yield db
    db.drop()


def admin_rows(server, sql, params=None):
    with server.admin() as conn, conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def connections_of(server, user, settle_s=5.0):
    """The user's connections once killed ones have finished (KILL returns before the thread ends)."""
    deadline = time.monotonic() + settle_s
    while True:
        count = admin_rows(server, "SELECT COUNT(*) FROM information_schema.processlist WHERE user = %s", (user,))[0][0]
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def leftovers(server, rank):
    pattern = f"cqd\\_r{rank}\\_%"
    databases = admin_rows(server, "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s", (pattern,))
    users = admin_rows(server, "SELECT user FROM mysql.user WHERE user LIKE %s", (pattern,))
    return list(databases) + list(users)


# ----------------------------------------------------------------- settings


def test_dsn_and_settings_are_checked():
    assert parse_dsn("mysql://bob:p%40ss@db.example:3307") == Address(host="db.example", port=3307, user="bob", password="p@ss")
    assert parse_dsn("mariadb://10.0.0.5").port == 3306
    with pytest.raises(ConfigError, match=r"server\.dsn: expected 'mysql://"):
        schema.build(ServerSettings, {"dsn": "postgres://x"}, "server")
    with pytest.raises(ConfigError, match=r"server\.backend: expected one of 'external' \| 'local' \| 'docker'"):
        schema.build(ServerSettings, {"backend": "sqlite"}, "server")
    with pytest.raises(ConfigError, match=r"server\.port: expected a TCP port"):
        schema.build(ServerSettings, {"port": 0}, "server")


def test_unique_names_are_short_distinct_and_name_rank_and_item():
    names = {unique_name(rank=12345, item="678") for _ in range(200)}
    assert len(names) == 200
    assert all(n.startswith("cqd_r12345_i678_") and len(n) <= 32 for n in names)


# --------------------------------------------------------- statement output


def test_statements_print_as_agentbench_prints_them(item):
    assert item.execute("SELECT id, name FROM `my table` WHERE id IN ('1', '2') ORDER BY id") == \
        "[('1', 'name 1'), ('2', 'name 2')]"
    assert item.execute("SELECT COUNT(*), SUM(id), NULL FROM `my table`") == "[(40, 780.0, None)]"
    assert item.execute("INSERT INTO `my table` VALUES ('40', 'x', 'y')") == "[]"
    assert item.execute("SELECT COUNT(*) FROM `my table`") == "[(41,)]"
    assert item.execute("SELECT * FROM nosuch") == f"1146 (42S02): Table '{item.name}.nosuch' doesn't exist"
    assert item.execute("SELEC 1").startswith("1064 (42000): You have an error in your SQL syntax")


def test_long_results_are_cut_at_800_characters_exactly_like_str_of_fetchall(item, server):
    text = item.execute("SELECT * FROM `my table` ORDER BY CAST(id AS UNSIGNED)")
    full = str(list(admin_rows(server, f"SELECT * FROM `{item.name}`.`my table` ORDER BY CAST(id AS UNSIGNED)")))
    assert len(full) > 800
    assert text == full[:800] + TRUNCATED_MARK


def test_table_hash_is_agentbench_row_hash(item):
    def python_hash(rows):
        rowhashes = sorted(hashlib.md5(",".join(v for v in row if v is not None).encode()).hexdigest()[:5] for row in rows)
        return f"[('{hashlib.md5(','.join(rowhashes).encode()).hexdigest()}',)]"

    assert item.table_hash(TABLE) == python_hash(TABLE.rows)
    item.execute("UPDATE `my table` SET name = 'changed' WHERE id = '3'")
    rows = [(i, "changed" if i == "3" else n, note) for i, n, note in TABLE.rows]
    assert item.table_hash(TABLE) == python_hash(rows)


def test_table_hash_uses_mysqls_group_concat_limit(server, rank):
    big = Table(name="big", columns=("v",), rows=tuple((str(i),) for i in range(400)))
    db = ItemDatabase.create(server, name=unique_name(rank=rank, item="big"))
    try:
        db.load(big)
        rowhashes = sorted(hashlib.md5(str(i).encode()).hexdigest()[:5] for i in range(400))
        cut = ",".join(rowhashes)[:1024]
        assert db.table_hash(big) == f"[('{hashlib.md5(cut.encode()).hexdigest()}',)]"
    finally:
        db.drop()


# ------------------------------------------------------------------ hostility


DENIED = ("1044 (", "1045 (", "1142 (", "1227 (")
"""Access-denied error numbers (which one depends on the server version)."""


@pytest.mark.parametrize("sql, expected", [
    ("DROP DATABASE mysql", DENIED),
    ("SELECT user, host FROM mysql.user", DENIED),
    ("GRANT ALL PRIVILEGES ON *.* TO CURRENT_USER", DENIED),
    ("SHUTDOWN", DENIED),
    ("LOAD DATA INFILE '/etc/passwd' INTO TABLE `my table`", DENIED),
    ("LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE `my table`", ("1148 (", "2068 (", "4166 (")),
    ("SELECT 1; DROP TABLE `my table`", ("1064 (",)),
    ("CREATE DATABASE cqd_escape", DENIED),
    ("CREATE USER 'intruder'@'%'", DENIED),
    ("SET GLOBAL max_connections = 1", DENIED),
    ("SELECT * FROM `my table` INTO OUTFILE '/tmp/cqd-outfile'", DENIED),
    ("KILL 1", ("1094 (", "1095 (")),
])
def test_hostile_statements_fail_and_leave_the_server_intact(item, server, sql, expected):
    assert item.execute(sql).startswith(expected)
    assert item.execute("SELECT COUNT(*) FROM `my table`") == "[(40,)]"
    assert admin_rows(server, "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = 'mysql'") == ((1,),)
    assert admin_rows(server, "SELECT COUNT(*) FROM mysql.user WHERE user = 'intruder'") == ((0,),)
    assert not Path("/tmp/cqd-outfile").exists()


def test_an_item_cannot_see_or_touch_another_items_database(server, rank):
    first = ItemDatabase.create(server, name=unique_name(rank=rank, item="a"))
    second = ItemDatabase.create(server, name=unique_name(rank=rank, item="b"))
    try:
        first.load(TABLE)
        second.load(TABLE)
        other = f"`{second.name}`.`my table`"
        assert first.execute(f"SELECT * FROM {other}").startswith("1142 (42000): SELECT command denied")
        assert first.execute(f"DELETE FROM {other}").startswith("1142 (42000): DELETE command denied")
        assert first.execute(f"DROP DATABASE `{second.name}`").startswith("1044 (42000)")
        lookalike = first.name.replace("_", "X", 1)
        assert first.execute(f"CREATE DATABASE `{lookalike}`").startswith("1044 (42000)")
        assert first.execute("SELECT schema_name FROM information_schema.schemata ORDER BY 1") == \
            f"[('{first.name}',), ('information_schema',)]"
        assert first.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema NOT IN "
                             f"('information_schema', 'performance_schema', '{first.name}')") == "[(0,)]"
        assert first.execute("SELECT COUNT(*) FROM information_schema.user_privileges") == "[(1,)]"
        assert second.execute("SELECT COUNT(*) FROM `my table`") == "[(40,)]"
    finally:
        first.drop()
        second.drop()


def test_sleep_is_stopped_by_the_statement_time_limit(item):
    started = time.monotonic()
    text = item.execute("SELECT SLEEP(1000)")
    assert time.monotonic() - started < 5
    assert text == "1969 (70100): Query execution was interrupted (max_statement_time exceeded)"


def test_a_statement_that_lifts_its_own_limit_is_killed(item, server):
    started = time.monotonic()
    text = item.execute("SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(1000)")
    assert 1.5 < time.monotonic() - started < 6
    assert "time limit of 1 s" in text
    assert connections_of(server, item.name) == 0


def test_a_huge_cartesian_join_is_cut_without_fetching_it(item, server):
    started = time.monotonic()
    join = ", ".join(f"`my table` t{i}" for i in range(5))
    text = item.execute(f"SELECT * FROM {join}")
    assert time.monotonic() - started < 5
    assert len(text) == 800 + len(TRUNCATED_MARK) and text.endswith(TRUNCATED_MARK)
    counting = item.execute(f"SELECT COUNT(*) FROM {join}, `my table` t5")
    assert counting.startswith("1969 (70100)")
    assert time.monotonic() - started < 8
    assert connections_of(server, item.name) == 0
    assert item.execute("SELECT COUNT(*) FROM `my table`") == "[(40,)]"


def test_each_statement_gets_a_fresh_session_like_agentbench(item):
    assert item.execute("SET @x = 5") == "[]"
    assert item.execute("SELECT @x") == "[(None,)]"
    assert item.execute("CREATE TEMPORARY TABLE tmp (a INT)") == "[]"
    assert item.execute("SELECT * FROM tmp").startswith("1146 (42S02)")


def test_drop_removes_database_and_user(server, rank):
    db = ItemDatabase.create(server, name=unique_name(rank=rank, item="7"))
    db.load(TABLE)
    assert len(leftovers(server, rank)) == 2
    db.drop()
    db.drop()
    assert leftovers(server, rank) == []


def test_a_refused_table_leaves_the_database_usable(server, rank):
    db = ItemDatabase.create(server, name=unique_name(rank=rank, item="8"))
    try:
        with pytest.raises(pymysql.MySQLError, match="Incorrect column name"):
            db.load(Table(name="t", columns=("", "b"), rows=(("1", "2"),)))
        assert db.execute("SELECT * FROM t").startswith("1146 (42S02)")
        assert db.execute("SELECT 1 + 1") == "[(2,)]"
    finally:
        db.drop()


# ------------------------------------------------------------------ back-ends


def test_percent_signs_in_table_and_column_names_are_loaded_verbatim(server, rank):
    table = Table(name="Win % by 100%s", columns=("Team", "Win %", "%", "%(x)s"),
                  rows=(("ann", "50%", "1", "a"), ("bob", "%s", None, "b")))
    db = ItemDatabase.create(server, name=unique_name(rank=rank, item="pct"))
    try:
        db.load(table)
        assert db.execute("SELECT * FROM `Win % by 100%s` ORDER BY `Team`") == \
            "[('ann', '50%', '1', 'a'), ('bob', '%s', None, 'b')]"
    finally:
        db.drop()


def test_results_and_errors_show_the_alias_never_the_unique_name(server, rank):
    name = unique_name(rank=rank, item="alias")
    db = ItemDatabase.create(server, name=name, alias="my table")
    try:
        db.load(TABLE)
        shown = [db.execute(sql) for sql in (
            "SELECT DATABASE()", "SELECT * FROM nowhere", "SELECT schema_name FROM information_schema.schemata "
            "WHERE schema_name <> 'information_schema'", "USE mysql",
            "SELECT CONCAT(DATABASE(), REPEAT('x', 900))")]
        assert shown[0] == "[('my table',)]"
        assert shown[1] == "1146 (42S02): Table 'my table.nowhere' doesn't exist"
        assert shown[2] == "[('my table',)]"
        assert "'my table'" in shown[3] and shown[3].startswith("1044 (42000): Access denied for user")
        assert shown[4] == "[('my table" + "x" * (800 - len("[('my table")) + TRUNCATED_MARK
        assert not any(name in text for text in shown)
    finally:
        db.drop()


def test_an_unreachable_server_is_retried_then_named():
    port = free_port()
    server = ExternalServer(address=Address(host="127.0.0.1", port=port, user="root"), attempts=3, backoff_s=0.1)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=rf"MySQL back-end 'external' at root@127\.0\.0\.1:{port} is unreachable after 3 attempts"):
        server.ping()
    assert time.monotonic() - started >= 0.3


def test_a_wrong_admin_password_is_reported_clearly(server):
    address = parse_dsn(DSN)
    wrong = ExternalServer(address=Address(host=address.host, port=address.port, user="cqd_nobody", password="x"), attempts=1)
    with pytest.raises(BackendUnavailable, match=r"refuses the admin login \((1045|1698)"):
        wrong.ping()


def test_open_server_external_uses_dsn_over_host_fields():
    settings = schema.build(ServerSettings, {"dsn": DSN, "host": "192.0.2.1", "port": 1}, "server")
    with open_server(settings) as server:
        assert server.backend == "external"
        assert server.flavor in ("mariadb", "mysql")


def run_one_item(server) -> str:
    db = ItemDatabase.create(server, name=unique_name(rank=0, item="backend"))
    try:
        db.load(TABLE)
        db.execute("UPDATE `my table` SET name = 'z' WHERE id = '5'")
        return db.execute("SELECT name FROM `my table` WHERE id IN ('5', '6') ORDER BY id")
    finally:
        db.drop()


@pytest.mark.slow
def test_local_backend_starts_a_throwaway_server_and_removes_it(tmp_path):
    server = open_server(schema.build(ServerSettings, {"backend": "local"}, "server"), temp_dir=str(tmp_path))
    assert isinstance(server, LocalServer)
    process, pid, directory = server.process, server.pid, Path(server.directory)
    assert process.poll() is None and (directory / "data" / "mysql").is_dir()
    assert "mariadbd" in Path(f"/proc/{pid}/cmdline").read_text() or "mysqld" in Path(f"/proc/{pid}/cmdline").read_text()
    assert run_one_item(server) == "[('z',), ('name 6',)]"
    server.close()
    assert process.poll() is not None and not Path(f"/proc/{pid}").exists()
    assert not directory.exists()


ORPHAN = """
import os, signal
from cqd_mpi.sandboxes.mysql import LocalServer
server = LocalServer()
print(server.directory, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_local_server_does_not_outlive_a_killed_worker():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    worker = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True, env=env, timeout=120)
    assert worker.returncode == -9, worker.stderr
    directory = worker.stdout.strip()
    assert directory.startswith(("/tmp", os.environ.get("TMPDIR", "/tmp")))

    def server_alive():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if directory in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    return True
            except OSError:
                continue
        return False

    deadline = time.monotonic() + 30
    while (Path(directory).exists() or server_alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server_alive() and not Path(directory).exists()


def test_local_backend_names_a_missing_binary():
    with pytest.raises(BackendUnavailable, match="MySQL back-end 'local': cannot find the server binary 'no-such-mysqld'"):
        LocalServer(binary="no-such-mysqld")


def test_docker_backend_names_a_missing_engine():
    with pytest.raises(BackendUnavailable, match=r"back-end 'docker': no container engine answers at unix:///nonexistent/docker\.sock.*podman-service\.sh"):
        DockerServer(docker_host="unix:///nonexistent/docker.sock")


@pytest.mark.docker
def test_docker_backend_names_a_missing_image_and_how_to_build_it():
    docker_host = os.environ.get("DOCKER_HOST", "unix:///tmp/podman.sock")
    with pytest.raises(BackendUnavailable, match=r"image 'localhost/cqd-no-such-image:1' is not present .*env/mariadb-image\.sh"):
        DockerServer(image="localhost/cqd-no-such-image:1", docker_host=docker_host)


@pytest.mark.docker
@pytest.mark.slow
def test_docker_backend_runs_items_in_a_container_and_removes_it():
    docker_host = os.environ.get("DOCKER_HOST", "unix:///tmp/podman.sock")
    settings = schema.build(ServerSettings, {"backend": "docker", "docker_host": docker_host}, "server")
    server = open_server(settings)
    assert isinstance(server, DockerServer) and settings.image == DEFAULT_IMAGE
    container = server.container
    assert container.status == "running" and server.address.port != 3306
    assert run_one_item(server) == "[('z',), ('name 6',)]"
    server.close()
    names = [c.name for c in server.client.containers.list(all=True)]
    assert container.name not in names
