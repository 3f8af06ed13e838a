"""How migration bytes travel between hosts: TLS on migration sockets today.

``tls`` makes TLS contexts from ``tls-creds`` and runs the handshake (one deadline,
abortable); ``tls_channel`` is the record layer a reader and a writer thread share;
``tls_errors`` names each refusal; ``tls_certs`` writes throw-away credentials for tests.
Migration URIs, sockets and files will move here from ``migration.channels`` later.
"""
