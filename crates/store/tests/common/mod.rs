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
