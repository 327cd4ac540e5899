"""The update repository: signed channel manifests and package files.

- ``manifest``: the channel manifest's wire format (pydantic).
- ``client``: the repository over HTTP(S) or ``file://`` (manifest, signature, packages).
- ``conditional``: a verified manifest kept with its ETag (``If-None-Match``, 304).
- ``cache``: the content cache of package files: resumable downloads, verified by SHA-256.
- ``partial``: a transfer's partial file: hashed and written by threads, or received
  straight from the socket (``splice``) with the hash read back behind it.
- ``freshness``: refuses rolled-back and expired manifests.
- ``retry``: the download retry policy (L5): named transient errors only, every attempt logged.
- ``publish``: ``tgops keygen`` and ``tgops publish``, writing a static signed repository.

May import: the vocabulary at the top of ``core`` only (never the lifecycle or the store).
"""
