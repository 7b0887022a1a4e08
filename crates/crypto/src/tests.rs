//! Golden vectors — a change here makes existing repositories unreadable.
//! The key derivation, chunk id and chunk sealing vectors were checked
//! against independent implementations (Python `blake3`, libsodium's
//! `crypto_aead_xchacha20poly1305_ietf` through PyNaCl) — and tampering.

use imgstore_format::Id;

use crate::slots::slot_with;
use crate::*;

fn master() -> MasterKey {
    MasterKey::from_bytes(core::array::from_fn(|i| i as u8))
}

const SMALL: KdfParams = KdfParams {
    m_kib: 64,
    t: 1,
    p: 1,
};

#[test]
fn key_derivation_is_pinned() {
    let k = Keys::derive(&master());
    let (chunk_id, record_nonce, data, seed) = k.raw();
    assert_eq!(
        hex(&chunk_id),
        "c5dcfb334111c2f88b233a740b3d7a5fdc6246b6ffcf96f5ef373f70857f8f89"
    );
    assert_eq!(
        hex(&record_nonce),
        "c1028ede6f6c6b4a94ea3a0996cdda9dcdc1c0b7983350f179f6b2528709ef0a"
    );
    assert_eq!(
        hex(&data),
        "7cad2332fecf6f9709d06e807387f0cc3ae6e5069a98b0e6f05b08450de3db93"
    );
    assert_eq!(seed, 0x540024bb13f7ea2a);
    assert_eq!(
        k.chunk_id(b"hello").to_hex(),
        "46274302a3ccb958abbe09c659103c989fbada24c812abb5464dcc5fef67745d"
    );
    assert_ne!(k.chunk_id(b"hello"), Id::hash(b"hello"), "ids are keyed");
    // In server namespace "web" the first 8 bytes are its tag, the rest
    // unchanged; ids from any namespace match their content.
    let web = k.in_namespace("web");
    assert_eq!(
        web.chunk_id(b"hello").to_hex(),
        "9be6fbfdc469c96eabbe09c659103c989fbada24c812abb5464dcc5fef67745d"
    );
    assert!(k.chunk_id_matches(b"hello", &web.chunk_id(b"hello")));
    assert!(web.chunk_id_matches(b"hello", &k.chunk_id(b"hello")));
    assert!(!k.chunk_id_matches(b"hellp", &web.chunk_id(b"hello")));
}

#[test]
fn sealing_is_pinned() {
    let k = Keys::derive(&master());
    let id = k.chunk_id(b"hello");
    assert_eq!(
        hex(&k.seal_chunk_with(&id, b"frame", &[7; 24])),
        "e10707070707070707070707070707070707070707070707077223dc28aac93da74655f5389d785987f3b3579ee3"
    );
    let rec = k.seal_record(RecordKind::Region, b"recipe", &[Id([2; 32]), Id([1; 32])]);
    assert_eq!(
        hex(&rec),
        "e2520200000001010101010101010101010101010101010101010101010101010101010101010202020202020202020202020202020202020202020202020202020202020202a46b4aea5718744d915b34fc556087de230e3f63d03084de0490a7b40184060f9ae2889eb91c34205c6cdf43fc8e"
    );
    assert_eq!(k.open_record(RecordKind::Region, &rec).unwrap(), b"recipe");
    assert_eq!(
        record_children(RecordKind::Region, &rec).unwrap(),
        vec![Id([1; 32]), Id([2; 32])],
        "children in the clear, sorted"
    );
}

#[test]
fn key_slots_are_pinned_and_open_only_with_their_secret() {
    let pass = slot_with(
        &master(),
        &Secret::Passphrase(b"correct horse"),
        SMALL,
        0,
        &[3; 16],
        &[4; 24],
        "abcd",
    )
    .unwrap();
    assert_eq!(
        pass.wrapped,
        "0404040404040404040404040404040404040404040404044bf47939788a1677d8fcf660ad05e71fc33bfe5b47a66ff05edeb516e093016e064b924daa275e539bcb116bb5ff5cd8"
    );
    let file = slot_with(
        &master(),
        &Secret::KeyFile(b"key file bytes"),
        DEFAULT_KDF,
        0,
        &[5; 16],
        &[6; 24],
        "ef01",
    )
    .unwrap();
    assert_eq!(
        file.wrapped,
        "0606060606060606060606060606060606060606060606062e6af92f11d65564128420b536309671c12f844efc69a212a8295e85b3cb28f8433d5973ab8b5b14af8273a572c1f848"
    );
    let m = pass.open(&Secret::Passphrase(b"correct horse")).unwrap();
    assert_eq!(m.0, master().0);
    assert_eq!(
        pass.open(&Secret::Passphrase(b"wrong")).unwrap_err(),
        CryptoError::WrongSecret
    );
    assert_eq!(
        pass.open(&Secret::KeyFile(b"correct horse")).unwrap_err(),
        CryptoError::WrongSecret
    );
    assert_eq!(
        file.open(&Secret::KeyFile(b"key file bytes")).unwrap().0,
        master().0
    );
    let slots = vec![pass.clone(), file.clone()];
    assert!(open_any(&slots, &Secret::KeyFile(b"key file bytes")).is_ok());
    assert_eq!(
        open_any(&slots[..1], &Secret::KeyFile(b"key file bytes")).unwrap_err(),
        CryptoError::WrongSecret
    );
    // A slot whose id or kind was edited does not open.
    let mut edited = pass.clone();
    edited.id = "ffff".into();
    assert_eq!(
        edited
            .open(&Secret::Passphrase(b"correct horse"))
            .unwrap_err(),
        CryptoError::WrongSecret
    );
    // Slots survive their JSON form.
    let json = serde_json::to_string(&pass).unwrap();
    assert_eq!(serde_json::from_str::<KeySlot>(&json).unwrap(), pass);
    assert!(
        !json.contains(&hex(&master().0)),
        "the master key is not in the slot"
    );
}

#[test]
fn tampering_is_detected_never_served() {
    let k = Keys::derive(&master());
    let (a, b) = (k.chunk_id(b"chunk a"), k.chunk_id(b"chunk b"));
    let sa = k.seal_chunk(&a, b"frame of a").unwrap();
    let sb = k.seal_chunk(&b, b"frame of b").unwrap();
    assert_eq!(k.open_chunk(&a, &sa).unwrap(), b"frame of a");
    // Random nonces: the same chunk seals differently each time.
    assert_ne!(k.seal_chunk(&a, b"frame of a").unwrap(), sa);
    // A flipped byte anywhere, a swap of two same-size chunks, truncation.
    for i in 0..sa.len() {
        let mut t = sa.clone();
        t[i] ^= 0x01;
        assert!(k.open_chunk(&a, &t).is_err(), "byte {i}");
    }
    assert_eq!(
        k.open_chunk(&a, &sb).unwrap_err(),
        CryptoError::Forged {
            what: "sealed chunk"
        }
    );
    assert!(k.open_chunk(&a, &sa[..sa.len() - 1]).is_err());
    assert!(k.open_chunk(&a, &sa[..10]).is_err());
    // Records: bound to their kind and to their clear children.
    let r = k.seal_record(RecordKind::Snapshot, b"snapshot web01", &[a]);
    assert!(
        k.open_record(RecordKind::Page, &r).is_err(),
        "kind is bound"
    );
    let mut t = r.clone();
    t[10] ^= 0x80; // inside the first child id
    assert!(
        k.open_record(RecordKind::Snapshot, &t).is_err(),
        "children are bound"
    );
    for i in 0..r.len() {
        let mut t = r.clone();
        t[i] ^= 0x04;
        assert!(k.open_record(RecordKind::Snapshot, &t).is_err(), "byte {i}");
    }
    // Another key opens nothing.
    let other = Keys::derive(&MasterKey::from_bytes([9; 32]));
    assert!(other.open_chunk(&a, &sa).is_err());
    assert!(other.open_record(RecordKind::Snapshot, &r).is_err());
}

proptest::proptest! {
    #[test]
    fn sealed_parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
        let k = Keys::derive(&master());
        let _ = k.open_chunk(&Id([0; 32]), &bytes);
        let _ = k.open_record(RecordKind::Region, &bytes);
        let _ = record_children(RecordKind::Page, &bytes);
    }

    #[test]
    fn records_round_trip(enc in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..500), n in 0usize..20) {
        let k = Keys::derive(&master());
        let kids: Vec<Id> = (0..n).map(|i| Id([i as u8; 32])).collect();
        let s = k.seal_record(RecordKind::Page, &enc, &kids);
        proptest::prop_assert_eq!(k.open_record(RecordKind::Page, &s).unwrap(), enc.clone());
        proptest::prop_assert_eq!(k.seal_record(RecordKind::Page, &enc, &kids), s, "deterministic");
    }
}
