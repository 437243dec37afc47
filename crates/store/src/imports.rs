//! Checkpoints of `membrane import`: how far into a file its committed batches reach.

use chrono::{DateTime, Utc};

use crate::ingest::Message;
use crate::{Result, Store};

/// Which file an import reads: a different size or first block is a different file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportFile {
    pub path: String,
    pub size: i64,
    /// Hex SHA-256 of the file's first 64 KiB.
    pub head_sha256: String,
}

/// Where an import of a file stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ImportProgress {
    /// Byte offset of the first line not yet imported.
    pub byte_offset: i64,
    /// Lines before `byte_offset` (header and blank lines included).
    pub line: i64,
    pub applied: i64,
    pub duplicates: i64,
}

/// A file's checkpoint as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct ImportCheckpoint {
    #[sqlx(flatten)]
    pub progress: ImportProgress,
    /// When the whole file was imported, if it was.
    pub completed_at: Option<DateTime<Utc>>,
}

impl Store {
    pub async fn import_checkpoint(&self, file: &ImportFile) -> Result<Option<ImportCheckpoint>> {
        Ok(sqlx::query_as(
            "SELECT byte_offset, line, applied, duplicates, completed_at FROM import_checkpoints \
             WHERE path = $1 AND size = $2 AND head_sha256 = $3",
        )
        .bind(&file.path)
        .bind(file.size)
        .bind(&file.head_sha256)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Ingests `messages` (as [`Store::ingest`]), read from `before` up to `byte_offset` and
    /// `line`, and moves the file's checkpoint there in the same transaction: either both
    /// commit or neither. Returns the new checkpoint.
    pub async fn ingest_import_batch(
        &self,
        file: &ImportFile,
        messages: &[Message],
        before: ImportProgress,
        (byte_offset, line): (i64, i64),
    ) -> Result<ImportProgress> {
        let mut tx = self.pool().begin().await?;
        let outcome = Self::ingest_in(&mut tx, messages).await?;
        let reached = ImportProgress {
            byte_offset,
            line,
            applied: before.applied + outcome.applied as i64,
            duplicates: before.duplicates + outcome.duplicates as i64,
        };
        save(&mut tx, file, reached, false).await?;
        tx.commit().await?;
        Ok(reached)
    }

    /// Marks the file imported to its end.
    pub async fn complete_import(&self, file: &ImportFile, reached: ImportProgress) -> Result<()> {
        let mut conn = self.pool().acquire().await?;
        save(&mut conn, file, reached, true).await
    }

    /// Forgets the file's checkpoint, so the next import reads it from the start.
    pub async fn forget_import(&self, file: &ImportFile) -> Result<()> {
        sqlx::query(
            "DELETE FROM import_checkpoints WHERE path = $1 AND size = $2 AND head_sha256 = $3",
        )
        .bind(&file.path)
        .bind(file.size)
        .bind(&file.head_sha256)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

async fn save(
    conn: &mut sqlx::PgConnection,
    file: &ImportFile,
    progress: ImportProgress,
    completed: bool,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO import_checkpoints \
           (path, size, head_sha256, byte_offset, line, applied, duplicates, completed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $8 THEN now() END) \
         ON CONFLICT (path, size, head_sha256) DO UPDATE SET \
           byte_offset = excluded.byte_offset, line = excluded.line, \
           applied = excluded.applied, duplicates = excluded.duplicates, \
           completed_at = excluded.completed_at, updated_at = now()",
    )
    .bind(&file.path)
    .bind(file.size)
    .bind(&file.head_sha256)
    .bind(progress.byte_offset)
    .bind(progress.line)
    .bind(progress.applied)
    .bind(progress.duplicates)
    .bind(completed)
    .execute(conn)
    .await?;
    Ok(())
}
