"""sessiongate's gateway application: webchat API, channels, providers with failover, operator CLI.

Built on the ``middleware`` package (session lanes, write locks, transcripts,
``SessionGate``). :func:`app._server.create_app` builds the ASGI app;
``sessiongate serve`` (:mod:`sessiongate.gateway.commands.serve`) runs it under uvicorn.
"""
