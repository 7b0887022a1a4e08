//! Helpers shared by the store's integration tests.

/// A commit of decoded records, as plain stored bytes.
pub fn commit_plain(
    repo: &dyn imgstore_repo::Repository,
    snap: &imgstore_format::Snapshot,
    pages: &[imgstore_format::Page],
    parent: Option<&imgstore_format::Id>,
) -> imgstore_repo::Result<(imgstore_format::Id, u64)> {
    let pages: Vec<Vec<u8>> = pages.iter().map(|p| p.encode()).collect();
    repo.commit(&snap.encode(), &pages, parent)
}

/// A plain repository's config with the default chunking.
pub fn config() -> imgstore_format::RepoConfig {
    imgstore_format::RepoConfig::new(
        "ab".repeat(16),
        0,
        imgstore_format::ChunkingConfig {
            algorithm: "fastcdc-2020".into(),
            min: 16384,
            avg: 65536,
            max: 262144,
            zero_min: 16384,
        },
        3,
    )
}
