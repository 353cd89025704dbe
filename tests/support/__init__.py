"""Helpers shared by the tests (on pytest's pythonpath: ``from support.commands import run``)."""
