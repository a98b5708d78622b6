"""sessiongate's gateway application: webchat API, channels, providers with failover, operator CLI.

Built on the ``sessiongate`` library (session lanes, write locks, transcripts,
``SessionGate``), of which it imports only the public names.
``sessiongate.gateway._server.create_app`` builds the ASGI app; ``sessiongate
serve`` (:mod:`sessiongate.gateway.commands.serve`) runs it under uvicorn.
"""
