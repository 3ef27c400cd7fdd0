"""RDS, ElastiCache and the ALB of the launched stack, as real servers inside the switch.

Each runs as a plain process in the switch's network namespace (sandbox/stack/network.py),
listening on 10.77.0.1, where every instance's /etc/hosts sends the template's endpoint
names. Each is configured FROM the template's resolved properties (`from_model`), so a change
of port, user, auth or TLS in the template changes the stand-in:

- `Postgres` (AWS::RDS::DBInstance): PostgreSQL 15 (Debian's; the template asks for 17, which
  Debian 12 does not ship), MasterUsername with MasterUserPassword (scram-sha-256), DBName
  created, TLS on (a SandboxCa certificate for the endpoint name); over the network only TLS
  connections are accepted (hostssl), as the template's `sslmode=require` URL expects.
- `Broker` (AWS::ElastiCache::ReplicationGroup): redis-server with TLS when
  TransitEncryptionEnabled (no plain port then), AUTH with AuthToken, and the settings of its
  CacheParameterGroup (maxmemory-policy noeviction).
- `LoadBalancer` (ALB + listener + target group): HAProxy 2.6 listening on the listener's port,
  forwarding to the targets (the api-servers' addresses) on the target group's port, with its
  health check (path, interval, healthy/unhealthy thresholds, 200) and the ALB's idle timeout.
Secrets are written only to 0600 files of the stand-in's private directory, never to argv.
"""

from __future__ import annotations

import csv
import io
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sandbox.proc import die_with_parent, end_process, wait_for
from sandbox.stack.network import GATEWAY, PREFIX, Switch
from sandbox.stack.tls import SandboxCa
from sandbox.tiers import heavy

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _resolved(value: Any, what: str) -> str:
    text = str(value)
    if "{{resolve:" in text:
        raise ValueError(f"{what} is not resolved yet (create the stack's secrets first)")
    return text


def _first_of_type(model: Any, rtype: str) -> str:
    for rid, res in model.resources.items():
        if res["Type"] == rtype and model.active(rid):
            return rid
    raise ValueError(f"the template has no {rtype}")


class _Process:
    """A stand-in process inside the switch, ended by PID; its files in a private dir."""

    name = "standin"

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self.dir = Path(tempfile.mkdtemp(prefix=f"aea-{self.name}-"))
        os.chmod(self.dir, 0o700)
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.dir / f"{self.name}.log"

    def _spawn(self, argv: Sequence[str]) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.switch.argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                close_fds=True,
            )

    def _alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")

    def _private(self, name: str, text: str, owner: Optional[str] = None) -> Path:
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if owner:
            pw = pwd.getpwnam(owner)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def stop(self) -> None:
        end_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        self.stop()


@heavy("systemd")
class Postgres(_Process):
    name = "rds"

    def __init__(
        self, switch: Switch, ca: SandboxCa, hostname: str, user: str, password: str,
        dbname: str, port: int = 5432,
    ) -> None:  # fmt: skip
        super().__init__(switch)
        self.ca, self.hostname = ca, hostname
        self.user, self.password, self.dbname, self.port = user, password, dbname, int(port)
        self.data = self.dir / "data"

    @classmethod
    def from_model(cls, model: Any, switch: Switch, ca: SandboxCa) -> Postgres:
        rid = _first_of_type(model, "AWS::RDS::DBInstance")
        props = model.properties(rid)
        if props.get("Engine") != "postgres":
            raise ValueError(f"{rid}: engine {props.get('Engine')}, the sandbox has postgres")
        return cls(
            switch, ca, model.endpoint_host(rid), props["MasterUsername"],
            _resolved(props["MasterUserPassword"], f"{rid}.MasterUserPassword"),
            props.get("DBName", "postgres"), int(model.get_att(rid, "Endpoint.Port")),
        )  # fmt: skip

    def _as_postgres(self, argv: Sequence[str]) -> List[str]:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]

    def start(self) -> Postgres:
        pw = pwd.getpwnam("postgres")
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        pwfile = self._private("pw", self.password + "\n", owner="postgres")
        subprocess.run(
            self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", self.user,
                               "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"]),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        pwfile.unlink()
        cert, key = self.ca.issue("rds", [self.hostname], [GATEWAY])
        for src, dst in ((cert, "server.crt"), (key, "server.key")):
            shutil.copy(src, self.data / dst)
            os.chown(self.data / dst, pw.pw_uid, pw.pw_gid)
            os.chmod(self.data / dst, 0o600)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                f"listen_addresses = '{GATEWAY}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\nmax_connections = 300\n"
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                "password_encryption = scram-sha-256\n"
            )
        # local socket (a 0700 dir of postgres) for the stand-in's own set-up; the link: TLS only
        (self.data / "pg_hba.conf").write_text(
            f"local all all trust\nhostssl all all {PREFIX}.0/24 scram-sha-256\n"
        )
        self._spawn(self._as_postgres([str(PG_BIN / "postgres"), "-D", str(self.data)]))

        def ready() -> bool:
            self._alive()
            argv = [str(PG_BIN / "pg_isready"), "-q", "-h", str(self.dir), "-p", str(self.port)]
            return subprocess.run(argv, timeout=10).returncode == 0

        wait_for(ready, 60, "the RDS stand-in (postgres) to accept connections")
        if self.dbname != "postgres":
            subprocess.run(
                self._as_postgres([str(PG_BIN / "createdb"), "-h", str(self.dir), "-p",
                                   str(self.port), "-U", self.user, self.dbname]),
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        return self

    def psql(self, sql: str) -> str:
        """Run SQL as the master user over the private socket; the output (unaligned)."""
        p = subprocess.run(
            self._as_postgres([str(PG_BIN.parent / "bin" / "psql"), "-h", str(self.dir), "-p",
                               str(self.port), "-U", self.user, "-d", self.dbname, "-Atc", sql]),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if p.returncode != 0:
            raise RuntimeError(f"psql: {p.stderr}")
        return p.stdout


@heavy("redis")
class Broker(_Process):
    name = "elasticache"

    def __init__(
        self, switch: Switch, ca: SandboxCa, hostname: str, auth_token: Optional[str],
        port: int = 6379, tls: bool = True, settings: Optional[Dict[str, str]] = None,
    ) -> None:  # fmt: skip
        super().__init__(switch)
        self.ca, self.hostname, self.auth_token = ca, hostname, auth_token
        self.port, self.tls, self.settings = int(port), tls, dict(settings or {})

    @classmethod
    def from_model(cls, model: Any, switch: Switch, ca: SandboxCa) -> Broker:
        rid = _first_of_type(model, "AWS::ElastiCache::ReplicationGroup")
        props = model.properties(rid)
        if props.get("Engine", "redis") != "redis":
            raise ValueError(f"{rid}: engine {props['Engine']}, the sandbox has redis")
        token = props.get("AuthToken")
        settings: Dict[str, str] = {}
        group = model.resources[rid]["Properties"].get("CacheParameterGroupName")
        if isinstance(group, dict) and "Ref" in group:
            settings = {
                k: str(v) for k, v in (model.prop(group["Ref"], "Properties") or {}).items()
            }
        return cls(
            switch, ca, model.endpoint_host(rid),
            _resolved(token, f"{rid}.AuthToken") if token else None,
            int(model.get_att(rid, "PrimaryEndPoint.Port")),
            str(props.get("TransitEncryptionEnabled", False)).lower() == "true", settings,
        )  # fmt: skip

    def start(self) -> Broker:
        lines = [f"bind {GATEWAY}", "save ''", "appendonly no", f"dir {self.dir}"]
        if self.tls:
            cert, key = self.ca.issue("elasticache", [self.hostname], [GATEWAY])
            lines += [
                "port 0", f"tls-port {self.port}", f"tls-cert-file {cert}",
                f"tls-key-file {key}", f"tls-ca-cert-file {self.ca.cert}", "tls-auth-clients no",
            ]  # fmt: skip
        else:
            lines.append(f"port {self.port}")
        if self.auth_token:
            lines.append(f"requirepass {self.auth_token}")
        lines += [f"{k} {v}" for k, v in sorted(self.settings.items())]
        conf = self._private("redis.conf", "\n".join(lines) + "\n")
        self._spawn([shutil.which("redis-server") or "/usr/bin/redis-server", str(conf)])
        wait_for(lambda: self._alive() or self.cli("PING") == "PONG", 20, "the broker stand-in")
        return self

    def cli(self, *args: str) -> str:
        """redis-cli against the stand-in, as a client on the link would (TLS, AUTH)."""
        argv = ["redis-cli", "-h", GATEWAY, "-p", str(self.port)]
        if self.tls:
            argv += ["--tls", "--cacert", str(self.ca.cert)]
        env = dict(os.environ, REDISCLI_AUTH=self.auth_token or "")
        p = subprocess.run(
            self.switch.argv([*argv, *args]), capture_output=True, text=True, env=env, timeout=10
        )
        return p.stdout.strip()


@heavy("systemd")
class LoadBalancer(_Process):
    name = "alb"

    def __init__(
        self, switch: Switch, port: int, targets: Sequence[str], target_port: int,
        health_path: str, interval: int = 30, healthy: int = 5, unhealthy: int = 2,
        idle_timeout: int = 60,
    ) -> None:  # fmt: skip
        super().__init__(switch)
        self.port, self.targets, self.target_port = int(port), list(targets), int(target_port)
        self.health_path, self.interval = health_path, int(interval)
        self.healthy, self.unhealthy, self.idle_timeout = int(healthy), int(unhealthy), idle_timeout

    @classmethod
    def from_model(cls, model: Any, switch: Switch, targets: Sequence[str]) -> LoadBalancer:
        lb = _first_of_type(model, "AWS::ElasticLoadBalancingV2::LoadBalancer")
        listener = _first_of_type(model, "AWS::ElasticLoadBalancingV2::Listener")
        tg = _first_of_type(model, "AWS::ElasticLoadBalancingV2::TargetGroup")
        lprops, tprops = model.properties(listener), model.properties(tg)
        attrs = {a["Key"]: a["Value"] for a in model.prop(lb, "LoadBalancerAttributes") or []}
        if lprops.get("Protocol", "HTTP") != "HTTP" or tprops.get("Protocol") != "HTTP":
            raise ValueError("the sandbox's load balancer stand-in speaks HTTP only")
        return cls(
            switch, int(lprops["Port"]), targets, int(tprops["Port"]),
            tprops.get("HealthCheckPath", "/"), int(tprops.get("HealthCheckIntervalSeconds", 30)),
            int(tprops.get("HealthyThresholdCount", 5)),
            int(tprops.get("UnhealthyThresholdCount", 2)),
            int(attrs.get("idle_timeout.timeout_seconds", 60)),
        )  # fmt: skip

    def config(self) -> str:
        servers = "".join(
            f"    server t{i} {addr}:{self.target_port} check\n"
            for i, addr in enumerate(self.targets)
        )
        return (
            f"global\n    stats socket {self.dir}/stats.sock mode 600 level admin\n"
            f"defaults\n    mode http\n    timeout connect 5s\n"
            f"    timeout client {self.idle_timeout}s\n    timeout server {self.idle_timeout}s\n"
            f"frontend listener\n    bind {GATEWAY}:{self.port}\n    default_backend targets\n"
            f"backend targets\n    option httpchk GET {self.health_path}\n"
            f"    http-check expect status 200\n"
            f"    default-server inter {self.interval}s rise {self.healthy} "
            f"fall {self.unhealthy}\n{servers}"
        )

    def start(self) -> LoadBalancer:
        cfg = self._private("haproxy.cfg", self.config())
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses its config: {check.stderr.decode()}")
        self._spawn(["haproxy", "-db", "-f", str(cfg)])
        wait_for(lambda: self._alive() or self.target_health() is not None, 20, "haproxy")
        return self

    def _admin(self, command: str) -> Optional[str]:
        """One command on HAProxy's stats socket; its answer (None if it does not answer)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(self.dir / "stats.sock"))
                s.sendall(command.encode() + b"\n")
                return b"".join(iter(lambda: s.recv(65536), b"")).decode()
        except OSError:
            return None

    def register(self, addr: str) -> None:
        """Add a target while running, as the webserver group registers a launched instance
        (HAProxy's dynamic servers take no default-server: the health check is given again)."""
        name = f"t{len(self.targets)}"
        self.targets.append(addr)
        for cmd in (
            f"add server targets/{name} {addr}:{self.target_port} check inter "
            f"{self.interval}s rise {self.healthy} fall {self.unhealthy}",
            f"enable health targets/{name}",
            f"enable server targets/{name}",
        ):
            answer = (self._admin(cmd) or "").strip()
            if answer and not answer.startswith("New server registered"):
                raise RuntimeError(f"haproxy: {cmd}: {answer}")

    def _server(self, addr: str) -> str:
        return f"targets/t{self.targets.index(addr)}"

    def set_in_rotation(self, addr: str, on: bool) -> None:
        """As the ALB on (de)registration: `drain` takes a target out of rotation (requests in
        flight finish, no new ones reach it; health checks go on), `ready` puts it back."""
        cmd = f"set server {self._server(addr)} state {'ready' if on else 'drain'}"
        answer = (self._admin(cmd) or "").strip()
        if answer:
            raise RuntimeError(f"haproxy: {cmd}: {answer}")

    def in_rotation(self) -> List[str]:
        """The targets HAProxy may send new requests to right now (admin state ready, whatever
        their health), from its stats socket: the test of "at most one api-server out"."""
        lines = (self._admin("show servers state targets") or "").splitlines()
        # "1" (the format), "# be_id be_name srv_id srv_name ... srv_admin_state ...", rows
        header = next((ln[2:].split() for ln in lines if ln.startswith("# ")), [])
        names = {f"t{i}": a for i, a in enumerate(self.targets)}
        rows = [dict(zip(header, ln.split())) for ln in lines if not ln.startswith("#")]
        return [
            names[r["srv_name"]]
            for r in rows
            if r.get("srv_name") in names and r.get("srv_admin_state") == "0"
        ]

    def target_health(self) -> Optional[Dict[str, str]]:
        """{target address: UP/DOWN/...} from HAProxy's stats socket (None until it answers)."""
        data = self._admin("show stat")
        if data is None:
            return None
        rows = csv.DictReader(io.StringIO(data.lstrip("# ")))
        names = {f"t{i}": a for i, a in enumerate(self.targets)}
        return {names[r["svname"]]: r["status"].split()[0] for r in rows if r["svname"] in names}
