"""The Salesmsg emulator: an OAuth2 authorization server and Public API v2.2 stand-in.

Entry points live in ``salesmsg_emulator.server`` (``create_emulator_app``, ``serve``,
``EmulatorServer``); ``salesmsg_emulator/README.md`` describes the behaviour and the
``/_emulator`` test controls. Nothing is imported here, so the CLI stays fast.
"""
