"""Helpers the tests share: servers they run against and clients they drive them with."""
