"""What processes a test started and which sockets they hold, read from /proc (Linux).

A test marks the processes it starts with an environment variable (Ray's
processes inherit the environment of the one that started them), finds them
all by that mark, and lists their TCP and UDP sockets with both ends.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (``NAME=value``), zombies left out."""
    needle = marker.encode() + b"\0"
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if needle in (entry / "environ").read_bytes() + b"\0":
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    return sorted(found)


def command_line(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class Sock:
    proto: str
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    pid: int

    @property
    def on_loopback(self) -> bool:
        """Both ends in 127.0.0.0/8 (an unconnected remote end, port 0, counts as none)."""
        ends = [self.local] + ([self.remote] if self.remote[1] != 0 else [])
        return all(_is_ipv4_loopback(host) for host, _ in ends)


def _is_ipv4_loopback(host: str) -> bool:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return isinstance(addr, ipaddress.IPv4Address) and addr in ipaddress.ip_network("127.0.0.0/8")


def _address(text: str, v6: bool) -> tuple[str, int]:
    host_hex, port_hex = text.split(":")
    raw = bytes.fromhex(host_hex)
    if v6:  # four 32-bit words, each in host byte order
        raw = b"".join(struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, 16, 4))
        host = socket.inet_ntop(socket.AF_INET6, raw)
    else:
        host = socket.inet_ntop(socket.AF_INET, struct.pack("=I", struct.unpack(">I", raw)[0]))
    return host, int(port_hex, 16)


_TCP_STATES = {"01": "ESTABLISHED", "0A": "LISTEN", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "02": "SYN_SENT"}


def _socket_table(pid: int) -> dict[int, tuple[str, tuple[str, int], tuple[str, int], str]]:
    """inode -> (proto, local, remote, state), from the process's network namespace."""
    table = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = (PROC / str(pid) / "net" / proto).read_text().splitlines()[1:]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in lines:
            fields = line.split()
            local, remote = _address(fields[1], proto.endswith("6")), _address(fields[2], proto.endswith("6"))
            table[int(fields[9])] = (proto, local, remote, _TCP_STATES.get(fields[3], fields[3]))
    return table


def inet_sockets(pids: list[int]) -> list[Sock]:
    """The TCP/UDP sockets (IPv4 and IPv6) that ``pids`` hold open now."""
    out = []
    tables: dict[str, dict] = {}
    for pid in pids:
        try:
            netns = os.readlink(PROC / str(pid) / "ns" / "net")
            table = tables.setdefault(netns, _socket_table(pid))
            fds = list((PROC / str(pid) / "fd").iterdir())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except (FileNotFoundError, ProcessLookupError):
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in table:
                    proto, local, remote, state = table[inode]
                    out.append(Sock(proto, local, remote, state, pid))
    return out
