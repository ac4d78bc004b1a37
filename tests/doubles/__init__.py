"""Test doubles: in-memory stand-ins for the services echoq talks to."""
