"""The shared tier: agents' KV on Redis (or Valkey), for workers and machines that take turns
running the same agents.

Keys, under ``agentkv:<16 hex>:`` (a hash of the fingerprint and the salt: models, settings
and tenants never mix) or under ``<namespace>:`` when the user names one::

    blk/<hex>     a block payload, byte for byte as on disk, named by its digest (SET NX)
    kv/<hex>      an agent's tail payload, named by its digest (SET NX)
    agent/<hex>   an agent's manifest: a hash {gen, rec}, replaced only by a newer generation
    cut/<hex>     a shared prefix's record, named by its last block's chain key (SET NX)
    lease/<hex>   which worker runs the agent's turn now (expires on its own)

A save publishes the payloads Redis lacks, then the manifest through a compare-and-set (one
Lua script): a manifest is accepted only if its generation is newer than the one Redis
holds. A turn first takes the agent's lease (waiting, bounded, while another worker holds
it) and reads the manifest in the same round trip; the lease goes when the turn's manifest is
published. Nothing read here is trusted: payloads are checked by the disk tier's decoders
(digest, fingerprint, chain key), records by its parser.

Every call is bounded by the client's connect and read timeouts; a failure is logged, counted,
and opens a breaker that skips Redis for 1 s, then 2 s ... up to 30 s, so that a dead server
costs one timeout per backoff, not one per call. The caller goes on with the local tiers.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import xxhash

from .records import Record
from .redis_scripts import CLAIM, DROP, PUBLISH, RELEASE
from ..config import SharedTier
from ..errors import ConfigError, CorruptEntry, FingerprintMismatch
from .keys import mismatch

__all__ = ["RedisTier", "Remote"]

log = logging.getLogger(__name__)

EXTRA_HINT = "the shared tier needs the redis client: pip install 'agentkv[redis]'"

@dataclass(frozen=True)
class Remote:
    """An agent's manifest as read from the shared tier (checked, not yet its payloads)."""

    raw: bytes
    record: Record

    @property
    def version(self) -> Tuple[int, str]:
        return self.record.gen, self.record.sid


_DOWN = object()  # a call the breaker skipped or that failed


class RedisTier:
    """The shared tier's client: bounded calls, a breaker, and agentkv's key layout.

    ``count(**deltas)`` adds to the memory's counters (``shared_errors`` ...); ``machine`` is
    this machine's compute description (named when another machine's record is refused).
    """

    def __init__(self, cfg: SharedTier, fingerprint: bytes,
                 count: Callable[..., None] = lambda **kw: None, machine: str = "") -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise ConfigError(EXTRA_HINT) from exc
        self.cfg = cfg
        self._count = count
        self.machine = machine  # settings.compute(): named when a record is refused
        self._errors = (redis.RedisError, OSError, ValueError, TypeError, IndexError)
        try:
            self._client = redis.Redis.from_url(
                # 1 MiB reads: a 24 MB restore takes 11 ms instead of 20 with the default 64 KiB
                cfg.url, socket_connect_timeout=cfg.timeout, socket_timeout=cfg.timeout,
                socket_read_size=1 << 20,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
        except ValueError as exc:
            raise ConfigError(f"shared={cfg.url!r} is not a Redis URL: {exc}") from exc
        self._scripts = {name: self._client.register_script(src) for name, src in
                         (("claim", CLAIM), ("publish", PUBLISH), ("release", RELEASE),
                          ("drop", DROP))}
        self._me = uuid.uuid4().hex[:16] + ":"
        self._turns = 0
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = 0.0
        self.prefix = ""
        self.bind(fingerprint)

    def bind(self, fingerprint: bytes) -> None:
        """Key prefix for a fingerprint (the memory's settings changed: a new one)."""
        cfg = self.cfg
        salt = b"" if cfg.salt is None else cfg.salt.encode("utf-8", "surrogatepass")
        if cfg.namespace is None:
            self.prefix = "agentkv:" + xxhash.xxh3_64_hexdigest(fingerprint + b"\0" + salt) + ":"
        else:
            tenant = "" if cfg.salt is None else xxhash.xxh3_64_hexdigest(salt) + ":"
            self.prefix = cfg.namespace + ":" + tenant
        self.fingerprint = fingerprint

    # -- the breaker ----------------------------------------------------------------------

    def _run(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, or _DOWN if the breaker is open or the call fails (logged, counted)."""
        if time.monotonic() < self._down_until:
            return _DOWN
        try:
            out = call()
        except self._errors as exc:
            with self._lock:
                first = self._backoff == 0.0
                self._backoff = min(30.0, self._backoff * 2 or 1.0)
                self._down_until = time.monotonic() + self._backoff
            self._count(shared_errors=1)
            log.log(logging.WARNING if first else logging.DEBUG,
                    "agentkv: the shared tier at %s failed %s (%s: %s); going on with the local "
                    "tiers, retrying in %.0f s", _safe_url(self.cfg.url), what,
                    type(exc).__name__, exc, self._backoff)
            return _DOWN
        if self._backoff:
            with self._lock:
                self._backoff = 0.0
            log.info("agentkv: the shared tier at %s answers again", _safe_url(self.cfg.url))
        return out

    # -- agents ---------------------------------------------------------------------------

    def _agent(self, agent_id: str) -> Tuple[str, str]:
        h = xxhash.xxh3_128_hexdigest(agent_id.encode("utf-8", "surrogatepass"))
        return self.prefix + "agent/" + h, self.prefix + "lease/" + h

    def claim(self, agent_id: str) -> Tuple[Optional[Remote], Optional[str]]:
        """Take the agent's lease (waiting up to ``wait`` s while another worker holds it)
        and read its manifest: (the manifest, None if there is none, it does not check or
        Redis is away; the lease's token, for :meth:`publish` or :meth:`release`)."""
        manifest, lease = self._agent(agent_id)
        with self._lock:
            self._turns += 1
            token = f"{self._me}{self._turns}"
        held: Optional[str] = token  # the lease this turn holds (None: waited out)
        ms = str(int(self.cfg.lease * 1000))
        start = time.monotonic()
        deadline = start + self.cfg.wait
        while True:
            out = self._run("reading a manifest",
                            lambda: self._scripts["claim"](keys=[manifest, lease],
                                                           args=[token, self._me, ms]))
            if out is _DOWN:
                return None, None
            if int(out[0]) == 1:
                break
            now = time.monotonic()
            if now >= deadline:
                log.warning("agent %r: another worker's turn has held it for %.1f s; going on "
                            "from the last published state", agent_id, self.cfg.wait)
                held = None
                break
            time.sleep(min(0.01, deadline - now))
        if int(out[0]) != 1 or time.monotonic() - start > 0.05:
            self._count(shared_wait_seconds=time.monotonic() - start)
        gen, rec = out[2], out[3]
        if not rec:
            return None, held
        try:
            return self._remote(agent_id, gen, rec), held
        except (CorruptEntry, FingerprintMismatch) as exc:
            log.warning("agent %r: its manifest on the shared tier is not restored: %s",
                        agent_id, exc)
            self._count(rejected=1)
            if isinstance(exc, CorruptEntry) and not exc.future:  # damaged: would block
                self._run("deleting a damaged manifest",  # every later publish
                          lambda: self._scripts["drop"](keys=[manifest], args=[rec]))
            return None, held

    def _remote(self, agent_id: str, gen: Any, rec: Any) -> Remote:
        r = Record.from_bytes(rec)
        if r.kind != "agent" or r.name != agent_id:
            raise CorruptEntry("manifest names another agent")
        if gen is None or not bytes(gen).isdigit() or int(gen) != r.gen:
            raise CorruptEntry("manifest's generation disagrees with its record")
        if r.fingerprint != self.fingerprint.hex():
            raise FingerprintMismatch(mismatch(agent_id, r, self.machine))
        return Remote(bytes(rec), r)

    def release(self, agent_id: str, token: Optional[str]) -> None:
        """Give the agent's lease back (its turn published nothing)."""
        if token:
            _, lease = self._agent(agent_id)
            self._run("releasing a lease",
                      lambda: self._scripts["release"](keys=[lease], args=[token]))

    def publish(self, r: Record, payloads: Dict[str, Any], token: Optional[str],
                pause: Callable[[], None] = lambda: None) -> Optional[bool]:
        """Send the payloads Redis lacks, then the manifest if its generation is newer than
        Redis's (the lease ``token`` names is released either way). True: published; False:
        refused (a newer generation is there: logged, counted); None: Redis is away.
        ``pause`` is called before each step (a background publish yields to restores)."""
        token = token or ""
        if not self._send(payloads, pause):
            return None
        pause()
        manifest, lease = self._agent(r.name)
        out = self._run("publishing a manifest", lambda: self._scripts["publish"](
            keys=[manifest, lease], args=[r.gen, r.to_bytes(), self.cfg.ttl or 0, token]))
        if out is _DOWN:
            return None
        if int(out[0]) == 1:
            return True
        self._count(shared_refused=1)
        log.warning("agent %r: its turn (generation %d) was not published: the shared tier holds "
                    "generation %s, from a worker that ran the agent at the same time; the next "
                    "turn continues from that one", r.name, r.gen, _text(out[1]))
        return False

    def publish_cut(self, r: Record, payloads: Dict[str, Any],
                    pause: Callable[[], None] = lambda: None) -> Optional[bool]:
        """Send a shared prefix's blocks and record (the first worker's record stays)."""
        if not self._send(payloads, pause):
            return None
        key = self.prefix + "cut/" + r.name
        out = self._run("publishing a shared prefix",
                        lambda: self._client.set(key, r.to_bytes(), nx=True, ex=self.cfg.ttl))
        return None if out is _DOWN else True

    def _send(self, payloads: Dict[str, Any], pause: Callable[[], None]) -> bool:
        """SET NX the payloads Redis lacks (EXPIRE the ones it has, with a ttl); False if
        Redis is away."""
        keys = list(payloads)
        if not keys:
            return True
        ttl = self.cfg.ttl

        def send() -> int:
            pause()
            probe = self._client.pipeline(transaction=False)
            for k in keys:
                probe.exists(self.prefix + k)
            there = probe.execute()
            pause()
            pipe = self._client.pipeline(transaction=False)
            sent = 0
            for k, found in zip(keys, there):
                if found:
                    if ttl:
                        pipe.expire(self.prefix + k, ttl)
                    continue
                data = bytes(payloads[k])
                pipe.set(self.prefix + k, data, nx=True, ex=ttl)
                sent += len(data)
            pipe.execute()
            return sent
        sent = self._run("publishing payloads", send)
        if sent is _DOWN:
            return False
        self._count(shared_bytes_sent=sent)
        return True

    def forget(self, agent_id: str) -> None:
        manifest, _ = self._agent(agent_id)
        self._run("deleting a manifest", lambda: self._client.delete(manifest))

    # -- payloads and prefixes ------------------------------------------------------------

    def fetch(self, keys: List[str]) -> Dict[str, Optional[bytes]]:
        """The payloads under ``keys`` (None for each one Redis does not hold, or all of
        them when Redis is away); their bytes are counted, not yet checked."""
        if not keys:
            return {}
        got = self._run("reading payloads",
                        lambda: self._client.mget([self.prefix + k for k in keys]))
        if got is _DOWN:
            return {k: None for k in keys}
        out = {k: (bytes(v) if v is not None else None) for k, v in zip(keys, got)}
        self._count(shared_bytes_read=sum(len(v) for v in out.values() if v is not None))
        return out

    def discard(self, key: str) -> None:
        """Delete a payload found damaged (a later save that holds its bytes sends them again)."""
        self._run("deleting a damaged payload", lambda: self._client.delete(self.prefix + key))

    def cuts(self, chain: List[str]) -> List[Record]:
        """Shared prefixes published for the leading blocks of ``chain`` (hex chain keys)."""
        if not chain:
            return []
        got = self._run("looking up shared prefixes",
                        lambda: self._client.mget([self.prefix + "cut/" + h for h in chain]))
        if got is _DOWN:
            return []
        out = []
        fp = self.fingerprint.hex()
        for h, raw in zip(chain, got):
            if raw is None:
                continue
            try:
                r = Record.from_bytes(raw)
            except CorruptEntry as exc:
                log.warning("a shared prefix on the shared tier does not parse: %s", exc)
                self._count(rejected=1)
                continue
            if r.kind == "cut" and r.name == h and r.fingerprint == fp:
                out.append(r)
        return out

    # -- inspection (python -m agentkv ls|verify --shared) ---------------------------------

    def scan(self, limit: int = 1_000_000) -> Iterator[Tuple[str, bytes]]:
        """(key prefix, record bytes) of every manifest and cut under the namespace given, or
        under every ``agentkv:`` namespace (at most ``limit`` keys looked at); raises what
        redis-py raises (the command line reports it)."""
        ns = self.cfg.namespace
        match = (_glob(self.prefix) if ns is not None else "agentkv:*:") + "*"
        for n, key in enumerate(self._client.scan_iter(match=match, count=1000)):
            if n >= limit:
                return
            k = key.decode("utf-8", "replace")
            for kind in ("agent/", "cut/"):
                at = k.rfind(":" + kind)
                if at < 0 or "/" in k[at + 1 + len(kind):]:
                    continue
                raw = self._client.hget(key, "rec") if kind == "agent/" else self._client.get(key)
                if raw is not None:
                    yield k[:at + 1], _raw(raw)
                break

    def read(self, prefix: str, keys: List[str]) -> Dict[str, Optional[bytes]]:
        """Payloads under another prefix, for inspection (raises what redis-py raises)."""
        got = self._client.mget([prefix + k for k in keys]) if keys else []
        return {k: (_raw(v) if v is not None else None) for k, v in zip(keys, got)}

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass


def _raw(v: Any) -> bytes:
    """A value as redis-py returns it (bytes; str only with decode_responses) as bytes."""
    return v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v)


def _text(v: Any) -> str:
    return v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)


def _glob(s: str) -> str:
    """``s`` with Redis glob characters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def _safe_url(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return scheme + "://***@" + rest.rsplit("@", 1)[1]
    return url
