-- Where each `membrane import` of a file got to, committed in the transaction of the batch it
-- follows: a killed import resumes exactly after its last committed batch, duplicating nothing
-- even for rows without a messageId. A file is known by its path, size and the SHA-256 of its
-- first 64 KiB, so an edited or replaced file starts afresh.
CREATE TABLE import_checkpoints (
    path         text NOT NULL,
    size         bigint NOT NULL,
    head_sha256  text NOT NULL,
    -- Byte offset of the first line not yet imported, and how many lines precede it.
    byte_offset  bigint NOT NULL,
    line         bigint NOT NULL,
    applied      bigint NOT NULL,
    duplicates   bigint NOT NULL,
    completed_at timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (path, size, head_sha256)
);

-- An HTTPS endpoint's own trust anchors (PEM), for receivers whose certificate no public CA
-- signed; NULL trusts the bundled public roots only.
ALTER TABLE webhook_endpoints ADD COLUMN ca_pem text;
