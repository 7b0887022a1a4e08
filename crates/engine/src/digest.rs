//! The whole-image digest, computed region by region in parallel.
//!
//! The digest recorded in a snapshot is exactly `BLAKE3(image)` — what
//! `b3sum IMAGE` prints — so a user can check a restored image with a tool
//! that is not imgstore. BLAKE3 is a tree hash over 1 KiB chunks, and a
//! region (a power of two of KiB, at an offset that is a multiple of its
//! size) is a complete subtree of it. So each region's chaining value can be
//! computed independently, on any thread, and the values merged afterwards
//! following BLAKE3's rule that a subtree's left half is the largest power
//! of two of chunks smaller than the whole.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use blake3::Hasher;

/// A hasher for the region starting at byte `offset` of the image.
pub fn region_hasher(offset: u64) -> Hasher {
    let mut h = Hasher::new();
    h.set_input_offset(offset);
    h
}

/// Feeds `len` zero bytes to a hasher without a buffer of that size.
pub fn update_zeros(h: &mut Hasher, mut len: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// What a finished region contributes to the image digest.
#[derive(Clone)]
pub enum RegionHash {
    /// The first region keeps its whole hasher: if it turns out to be the
    /// only region, it is the root and must be finalized as such.
    First(Box<Hasher>),
    /// Any later region: its subtree chaining value.
    Cv(ChainingValue),
}

impl RegionHash {
    pub fn from_hasher(index: u64, h: Hasher) -> RegionHash {
        if index == 0 {
            RegionHash::First(Box::new(h))
        } else {
            RegionHash::Cv(h.finalize_non_root())
        }
    }

    /// The region's subtree chaining value (what index pages record).
    pub fn cv(&self) -> ChainingValue {
        match self {
            RegionHash::First(h) => h.finalize_non_root(),
            RegionHash::Cv(cv) => *cv,
        }
    }
}

/// Combines per-region hashes into `BLAKE3(image)`. `regions[i]` covers
/// bytes `i*region_size ..`, and together they cover `size` bytes.
pub fn image_digest(regions: &[RegionHash], region_size: u64, size: u64) -> [u8; 32] {
    if size <= region_size {
        return match regions.first() {
            Some(RegionHash::First(h)) => *h.finalize().as_bytes(),
            _ => *blake3::hash(&[]).as_bytes(),
        };
    }
    fn subtree(regions: &[RegionHash], region_size: u64, len: u64) -> ChainingValue {
        if len <= region_size {
            return regions[0].cv();
        }
        let left = left_subtree_len(len);
        let split = (left / region_size) as usize;
        let l = subtree(&regions[..split], region_size, left);
        let r = subtree(&regions[split..], region_size, len - left);
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }
    let left = left_subtree_len(size);
    let split = (left / region_size) as usize;
    let l = subtree(&regions[..split], region_size, left);
    let r = subtree(&regions[split..], region_size, size - left);
    *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_by_regions(data: &[u8], region: usize) -> [u8; 32] {
        let hashes: Vec<RegionHash> = data
            .chunks(region)
            .enumerate()
            .map(|(i, c)| {
                let mut h = region_hasher((i * region) as u64);
                h.update(c);
                RegionHash::from_hasher(i as u64, h)
            })
            .collect();
        image_digest(&hashes, region as u64, data.len() as u64)
    }

    #[test]
    fn equals_plain_blake3_at_boundary_lengths() {
        let region = 4096usize;
        let data: Vec<u8> = (0..region * 9 + 100)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for len in [
            0,
            1,
            1024,
            region - 1,
            region,
            region + 1,
            2 * region,
            3 * region + 7,
            4 * region,
            5 * region - 1,
            8 * region,
            8 * region + 1,
            data.len(),
        ] {
            let d = &data[..len];
            assert_eq!(
                digest_by_regions(d, region),
                *blake3::hash(d).as_bytes(),
                "len {len}"
            );
        }
    }

    #[test]
    fn zeros_helper_matches() {
        let mut a = region_hasher(0);
        update_zeros(&mut a, 200_000);
        assert_eq!(a.finalize(), blake3::hash(&vec![0u8; 200_000]));
    }
}
