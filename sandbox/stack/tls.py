"""A throwaway certificate authority for the launched stack's TLS stand-ins.

ElastiCache (TransitEncryptionEnabled) and RDS (`sslmode=require`) present certificates signed
by Amazon's CAs, which an AL2023 instance already trusts. The sandbox's Redis and PostgreSQL
present certificates of this CA instead, and each instance gets the CA in its system trust
store (its own overlay: /usr/local/share/ca-certificates + update-ca-certificates), the store
Python's ssl (redis-py under kombu: `ssl_cert_reqs=required`) reads by default. Keys are made
by openssl in a private directory of the supervisor and deleted with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple


class SandboxCa:
    def __init__(self, directory: Optional[Path] = None) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="aea-ca-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.cert = self.dir / "ca.pem"
        self.key = self.dir / "ca.key"

    def _openssl(self, *args: str) -> None:
        p = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {p.stderr[-2000:]}")

    def create(self) -> SandboxCa:
        if not self.cert.exists():
            self._openssl(
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3",
                "-keyout", str(self.key), "-out", str(self.cert),
                "-subj", "/CN=airflow-ec2-agent sandbox CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            )  # fmt: skip
        return self

    def issue(
        self, name: str, hostnames: Sequence[str], ips: Sequence[str] = ()
    ) -> Tuple[Path, Path]:
        """(certificate, key) for a server known by these names and addresses."""
        cert, key, csr = (self.dir / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
        ext = self.dir / f"{name}.ext"
        alt = [f"DNS:{h}" for h in hostnames] + [f"IP:{i}" for i in ips]
        ext.write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(alt)}\n"
        )
        self._openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN={hostnames[0] if hostnames else ips[0]}",
        )  # fmt: skip
        self._openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-days", "3", "-out", str(cert), "-extfile", str(ext),
        )  # fmt: skip
        return cert, key

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
