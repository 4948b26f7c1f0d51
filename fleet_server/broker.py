"""The fleet's MQTT broker: an embedded Mosquitto with mutual TLS and per-device ACLs, or an
external broker given by URL.

The embedded broker is a ``mosquitto -c CONFIG`` child process whose files live in one data
directory (all regenerated at every start, except the persistence database)::

    DATA/
      mosquitto.conf     the configuration (:func:`~fleet_server.broker_config.render_config`)
      acl                the access control list (:func:`~.broker_config.render_acl`)
      mosquitto.log      the broker's log (appended to by every run)
      mosquitto.pid      the running broker's process id
      persistence/       retained messages and persistent sessions (mosquitto.db)

What those files say, and the security model they enforce, is :mod:`fleet_server.broker_config`
(from one :class:`~fleet_server.broker_config.BrokerConfig`, re-exported here as the argument
of :meth:`Broker.embedded`); one Mosquitto process (finding, probing and stopping it) is
:mod:`fleet_server.mosquitto`'s; this module runs and supervises it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from types import TracebackType

from paho.mqtt.client import Client
from paho.mqtt.enums import MQTTProtocolVersion

from protocol.names import check_name
from transport.mqtt import BrokerAddress, ClientSettings, TLSIdentity, create_client

from .broker_config import BrokerConfig, render_acl, render_config
from .errors import BrokerError
from .mosquitto import (
    POLL_INTERVAL,
    check_port_free,
    death_signal_prefix,
    find_mosquitto,
    free_port,
    local_host,
    stop_orphan,
    terminate,
    wait_ready,
)

__all__ = ["Broker", "BrokerConfig"]

log = logging.getLogger(__name__)

_LOG_TAIL_LINES = 20
#: A free port found by binding port 0 can be taken by someone else before mosquitto binds
#: it; starting again on a fresh port resolves that race.
_PORT_ATTEMPTS = 3
#: Back-off between restarts of a broker that exited: doubling from the minimum to the
#: maximum, back to the minimum once it ran for _RESTART_RESET_S.
_RESTART_MIN_S = 1.0
_RESTART_MAX_S = 30.0
_RESTART_RESET_S = 60.0


class Broker:
    """A broker the fleet talks to: an embedded Mosquitto process, or an external broker.

    Use as a context manager (``with Broker.embedded(config) as broker:``), which starts
    and stops an embedded broker; for an external broker start and stop do nothing, so
    callers treat both alike.

    An embedded broker is supervised: should Mosquitto exit while it is meant to run, it is
    started again on the same port after a back-off (1 s doubling to 30 s), and its life is
    tied to the server's: it gets SIGTERM when the thread that supervises it dies, even by
    ``kill -9`` of the server (``setpriv --pdeathsig``), and one left over by a server that
    died anyway (its pid is in ``DATA/mosquitto.pid``) is stopped before a new one starts.
    """

    def __init__(self, address: BrokerAddress | None, config: BrokerConfig | None = None,
                 mosquitto: str | None = None) -> None:
        """Use :meth:`embedded` or :meth:`external`."""
        self._address = address
        self._config = config
        self._mosquitto = mosquitto
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        # Guards _process against stop() racing a restart of the supervisor thread.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # restart(): asks the supervisor to start Mosquitto again at once, and hears back.
        self._restarting = threading.Event()
        self._restarted = threading.Event()
        self._supervisor: threading.Thread | None = None
        #: How many times the supervisor started Mosquitto again after it exited.
        self.restarts = 0
        #: When (time.time()) Mosquitto last exited unexpectedly, None while it runs.
        self.down_since: float | None = None

    @classmethod
    def embedded(cls, config: BrokerConfig, *, mosquitto: str | None = None) -> Broker:
        """A Mosquitto broker for ``config``, not started yet (see :meth:`start`).

        ``mosquitto`` is the executable; by default :func:`find_mosquitto`.
        """
        try:
            check_name(config.fleet, "fleet name")
            for identity in (config.server_identity, *config.more_server_identities):
                check_name(identity, "server identity")
        except ValueError as exc:
            raise BrokerError(str(exc)) from exc
        executable = mosquitto or find_mosquitto()
        if executable is None:
            raise BrokerError("mosquitto is not installed (not on PATH nor in /usr/sbin); "
                              "install it (e.g. apt install mosquitto) or use an external "
                              "broker by URL")
        return cls(None, config, executable)

    @classmethod
    def external(cls, url: str) -> Broker:
        """A broker someone else runs, at ``mqtts://host[:port]``; no process is managed.

        It must enforce what the embedded one does (docs/transport.md, "Using an external broker").
        """
        try:
            return cls(BrokerAddress.from_url(url))
        except ValueError as exc:
            raise BrokerError(str(exc)) from exc

    @property
    def address(self) -> BrokerAddress:
        """Where clients on this machine connect (for an embedded broker: once started)."""
        if self._address is None:
            raise RuntimeError("the embedded broker has no address until start() is called")
        return self._address

    @property
    def embedded_process(self) -> bool:
        """True for an embedded broker (a Mosquitto process this object manages)."""
        return self._config is not None

    @property
    def running(self) -> bool:
        """True while an embedded broker's process is alive."""
        process = self._process
        return process is not None and process.poll() is None

    @property
    def pid(self) -> int | None:
        """The embedded broker's process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def client(self, identity: TLSIdentity,
               protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5, *,
               max_packet_size: int | None = None) -> Client:
        """A paho-mqtt client of this broker for ``identity`` (``create_client``; with
        MQTT 5 it announces ``max_packet_size``), not connected yet."""
        try:
            return create_client(ClientSettings(self.address, identity, protocol=protocol,
                                                max_packet_size=max_packet_size))
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot set up an MQTT client from {identity.cert_file} and "
                              f"{identity.key_file} ({exc}); check that both files exist "
                              "and belong together") from exc

    def start(self, timeout: float = 10.0) -> None:
        """Start the embedded broker and its supervisor; return once it accepts TLS
        connections.

        Raises BrokerError, with the end of mosquitto's log, if it exits, its port is taken
        by another process, or it does not accept a TLS handshake within ``timeout``
        seconds; nothing is left running then.
        """
        if self._config is None or self._mosquitto is None:
            return
        if self._supervisor is not None:
            raise RuntimeError("the broker is already started; stop() it first")
        config = self._config
        self._write_files(config)
        stop_orphan(config)
        self._stopping.clear()
        started: list[BrokerError | None] = []
        ready = threading.Event()

        def supervise() -> None:
            # The first start happens here too: the death signal follows the thread that
            # forked Mosquitto, and this thread lives exactly as long as the broker should.
            try:
                self._launch(config, timeout)
            except BrokerError as exc:
                started.append(exc)
                ready.set()
                return
            started.append(None)
            ready.set()
            self._watch(config, timeout)

        self._supervisor = threading.Thread(target=supervise, name="broker-supervisor",
                                            daemon=True)
        self._supervisor.start()
        ready.wait()
        if started[0] is not None:
            self._supervisor.join()
            self._supervisor = None
            raise started[0]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the embedded broker: SIGTERM (Mosquitto then saves its persistence
        database), SIGKILL if it has not exited after ``timeout`` seconds. Idempotent."""
        self._stopping.set()
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            terminate(process, timeout)
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join()

    def reload_crl(self, timeout: float = 10.0) -> bool:
        """Make the embedded broker read its CRL again, so that certificates revoked since
        are refused from the next handshake on; returns once it has (True).

        Mosquitto 2.0 re-reads its listeners' certificates and CRL on SIGHUP (the manual
        only mentions the certificates; tests/fleet_server/test_broker.py proves the CRL)
        and logs "Reloading config." first: its event loop finishes the reload before it
        accepts another connection, so that line is the moment the new CRL applies.
        Connections already open are not dropped. An external broker, or a stopped one,
        is not touched (False): the operator copies ``crl.pem`` to an external broker
        (docs/transport.md)."""
        if self._config is None:
            log.warning("the fleet CA's revocation list changed: copy it to the external "
                        "broker and make it reload (docs/transport.md, 'Using an external broker')")
            return False
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                return False
            log_path = self._config.data_dir / "mosquitto.log"
            offset = log_path.stat().st_size if log_path.exists() else 0
            process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with log_path.open("rb") as f:
                    f.seek(offset)
                    if b"Reloading config." in f.read():
                        log.info("the broker re-read the certificate revocation list")
                        return True
            except OSError:
                pass
            time.sleep(POLL_INTERVAL)
        log.error("mosquitto did not log a reload within %.0f s of SIGHUP; revoked "
                  "certificates may still connect until it restarts", timeout)
        return False

    def restart(self, timeout: float = 10.0) -> None:
        """Stop the embedded broker and start it again on the same port, which drops every
        connection (clients reconnect; persistent sessions and retained messages are
        kept). The way to cut off a client whose certificate was just revoked: Mosquitto
        2.0 has no other means to disconnect one. Nothing happens for an external broker.
        Raises BrokerError if it does not start again."""
        if self._config is None:
            return
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                return  # down already: the supervisor starts it, and it reads the CRL then
            self._process = None
            self._restarting.set()
        terminate(process, timeout)
        if not self._restarted.wait(timeout * 2):
            raise BrokerError(f"mosquitto did not start again within {timeout * 2:.0f} s; "
                              f"its log:\n{self.log_tail()}")
        self._restarted.clear()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines mosquitto logged in this run ("" if none or external)."""
        if self._config is None:
            return ""
        try:
            with (self._config.data_dir / "mosquitto.log").open("rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _launch(self, config: BrokerConfig, timeout: float) -> None:
        """Start Mosquitto and wait until it is ready; on the port it had, if it had one."""
        previous = self._address.port if self._address else None
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            fixed = config.port or (previous if attempt == 1 and previous else 0)
            port = fixed or free_port(config.bind_address)
            if fixed:
                check_port_free(config.bind_address, port)
            address = BrokerAddress(local_host(config.bind_address), port)
            self._address = address
            process = self._spawn(config, port)
            try:
                wait_ready(process, address, config.tls, timeout, self.log_tail)
            except BrokerError:
                in_use = "Address already in use" in self.log_tail()
                with self._lock:
                    if self._process is process:
                        self._process = None
                terminate(process, 5.0)
                if in_use and not fixed and attempt < _PORT_ATTEMPTS:
                    log.debug("port %d was taken before mosquitto bound it; retrying", port)
                    continue
                raise
            log.info("mosquitto for fleet %s listening on port %d (data in %s)", config.fleet,
                     port, config.data_dir)
            return

    def _watch(self, config: BrokerConfig, timeout: float) -> None:
        """Wait for Mosquitto to exit; unless stopping, start it again with back-off."""
        delay = _RESTART_MIN_S
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            if self._restarting.is_set():
                self._restarting.clear()
                try:
                    self._launch(config, timeout)
                except BrokerError as exc:
                    log.error("could not start mosquitto again after a restart (%s)", exc)
                else:
                    self._restarted.set()
                    continue
            self.down_since = time.time()
            if time.monotonic() - started > _RESTART_RESET_S:
                delay = _RESTART_MIN_S
            log.error("mosquitto (pid %d) exited with code %s while the fleet server runs; "
                      "starting it again in %.0f s. The end of its log:\n%s", process.pid,
                      code, delay, self.log_tail())
            while not self._stopping.wait(delay):
                delay = min(delay * 2, _RESTART_MAX_S)
                try:
                    self._launch(config, timeout)
                except BrokerError as exc:
                    log.error("could not start mosquitto again (%s); retrying in %.0f s",
                              exc, delay)
                    continue
                self.restarts += 1
                self.down_since = None
                log.warning("mosquitto is running again (restart %d)", self.restarts)
                break

    def _write_files(self, config: BrokerConfig) -> None:
        try:
            (config.data_dir / "persistence").mkdir(parents=True, exist_ok=True)
            (config.data_dir / "acl").write_text(
                render_acl(config.fleet, config.server_identity,
                           config.more_server_identities), encoding="utf-8")
        except OSError as exc:
            raise BrokerError(f"cannot prepare the broker directory {config.data_dir} "
                              f"({exc}); choose a writable data directory") from exc

    def _spawn(self, config: BrokerConfig, port: int) -> subprocess.Popen[bytes]:
        conf = config.data_dir / "mosquitto.conf"
        log_path = config.data_dir / "mosquitto.log"
        with self._lock:
            if self._stopping.is_set():
                raise BrokerError("the broker is stopping")
            try:
                # setpriv would start and then fail to exec it: check here, for a clear error.
                if not os.access(str(self._mosquitto), os.X_OK):
                    raise OSError(f"{self._mosquitto} is not an executable file")
                conf.write_text(render_config(config, port), encoding="utf-8")
                self._log_offset = log_path.stat().st_size if log_path.exists() else 0
                # Appended to, so the log of an earlier run (e.g. before a crash) is kept;
                # the child has its own copy of the descriptor, ours is closed at once.
                with log_path.open("ab") as log_file:
                    process = subprocess.Popen(
                        [*death_signal_prefix(), str(self._mosquitto), "-c", str(conf)],
                        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
            except OSError as exc:
                raise BrokerError(f"cannot start {self._mosquitto} ({exc}); check that it is "
                                  "mosquitto 2.x and that the data directory is "
                                  "writable") from exc
            self._process = process
        return process
