"""Testing code that uses the Assistants API against this server, offline.

- ``app.testing.plugin``: the pytest plugin (loaded automatically through the
  package's ``pytest11`` entry point): fixtures ``assistants_server`` and
  ``assistants``.
- ``app.testing.server``: start ``assistants-server serve --ephemeral`` as a
  subprocess and wait for it (usable from any harness).
- ``app.testing.client``: a handle on a running server: its ``base_url`` and
  key, per-test reset, scripted offline answers, the model-request log.

None of these import the ``openai`` SDK except when asked for a client, so
they work next to whatever SDK version a project pins. See docs/testing.md.
"""
