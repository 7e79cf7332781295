"""The block store: records and payloads, their index, raw-bytes files on disk, the lock
shared by processes, the at-rest transcoding, and the shared (Redis) tier."""
