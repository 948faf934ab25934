"""The wire layer: how a source and a receiver talk, from message to socket.

Layered bottom-up, each module importing only those before it:

* messages: one frozen dataclass per message, its msgpack array form, protocol versions and
  what each added (FEATURES).
* frames: length-prefixed msgpack frames with size limits; bytes in, messages out.
* session: sans-I/O sessions' shared part: the protocol's states and limits, the
  authentication proofs, the Session base that buffers bytes and validates messages.
* source_session, receiver_session: each end's rules (what it may send and accept when).
* transport: the asyncio adapter pumping a session's bytes over TCP/TLS; TLS contexts, backoff.

Nothing here imports cdp.source, cdp.receiver or cdp.replica: data flows one way.
"""
