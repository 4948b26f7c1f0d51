#!/usr/bin/env bash
# Turn on RabbitMQ's MQTT plugin for the external-broker tests (docs/scale.md), as root, on a
# machine whose RabbitMQ (Debian's rabbitmq-server) listens on 127.0.0.1:5672. Idempotent.
#
# - MQTT over TCP on 127.0.0.1:1884 and over TLS on 127.0.0.1:8884 (1883 stays Mosquitto's);
# - TLS with required client certificates, the user name taken from the certificate's CN
#   (mqtt.ssl_cert_login), no anonymous logins;
# - the TLS files in $TLS_DIR: a placeholder CA and server certificate made here so that the
#   listener starts; tests/rabbitmq_broker.py writes its own fleet CA there and clears
#   RabbitMQ's PEM cache.
#
# Undo: restore /etc/rabbitmq/rabbitmq.conf from rabbitmq.conf.before-edgefleet,
# `rabbitmq-plugins disable rabbitmq_mqtt`, restart rabbitmq-server.
set -euo pipefail
TLS_DIR=${EDGEFLEET_RABBITMQ_TLS_DIR:-/var/lib/rabbitmq/edgefleet-tls}
CONF=/etc/rabbitmq/rabbitmq.conf
MARK="# edgefleet: MQTT plugin for the external-broker tests (scripts/rabbitmq_mqtt.sh)"

install -d -o rabbitmq -g rabbitmq -m 0755 "$TLS_DIR"
if [ ! -s "$TLS_DIR/server.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=edgefleet placeholder CA" -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" \
    2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
  openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 3650 -out "$TLS_DIR/server.crt" 2>/dev/null
  rm -f "$TLS_DIR/server.csr" "$TLS_DIR/ca.key" "$TLS_DIR/ca.srl"
  chown rabbitmq:rabbitmq "$TLS_DIR"/*
  chmod 0644 "$TLS_DIR"/*
fi

if ! grep -qF "$MARK" "$CONF"; then
  [ -e "$CONF.before-edgefleet" ] || cp -p "$CONF" "$CONF.before-edgefleet"
  cat >> "$CONF" <<CONF
$MARK
mqtt.listeners.tcp.default = 127.0.0.1:1884
mqtt.listeners.ssl.default = 127.0.0.1:8884
mqtt.allow_anonymous = false
mqtt.ssl_cert_login = true
ssl_cert_login_from = common_name
ssl_options.cacertfile = $TLS_DIR/ca.crt
ssl_options.certfile = $TLS_DIR/server.crt
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
CONF
fi

rabbitmq-plugins enable --offline rabbitmq_mqtt >/dev/null
# Not `service rabbitmq-server restart`: its stop waits for a pid file that a node started
# otherwise never wrote.
if rabbitmqctl status >/dev/null 2>&1; then
  timeout 120 rabbitmqctl stop >/dev/null
  while pgrep -u rabbitmq -x beam.smp >/dev/null; do sleep 0.5; done
fi
timeout 180 /etc/init.d/rabbitmq-server start >/dev/null
timeout 120 rabbitmqctl await_startup >/dev/null
echo "RabbitMQ MQTT: tcp 127.0.0.1:1884, tls 127.0.0.1:8884 (files in $TLS_DIR)"
