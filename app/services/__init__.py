"""Queries and rules, one module per resource. Services never commit: the
caller (a route or the worker) owns the transaction."""
