"""Adapters both the agent and the fleet server use to reach the broker.

:mod:`transport.mqtt` wraps paho-mqtt (mutual TLS, persistent sessions) and
:mod:`transport.x509` the device's key, certificate request and fingerprints. What travels
over the connection is :mod:`protocol`'s.
"""
