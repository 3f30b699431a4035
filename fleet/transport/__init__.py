"""The controller on MQTT: the one client factory, the repository server, ingest of device messages, announcements."""
