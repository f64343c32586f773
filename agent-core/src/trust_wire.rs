//! Decoding a signed trust document in place, with a small stack.
//!
//! [`SignedTrust::decode`] (serde) builds the nested vectors of a trust document through
//! temporaries: on a Cortex-M3 its frame was about 10 KB, more than the firmware can spare
//! on top of a session's. [`decode_into`] reads the same postcard encoding field by field
//! straight into a [`SignedTrust`] the caller holds, so the frame is that value plus a few
//! hundred bytes. It accepts what [`SignedTrust::decode`] accepts (a test compares the two);
//! what is judged afterwards ([`baton_protocol::trust::TrustAnchor::accept`]) re-encodes the
//! document to hash it, so no encoding detail can change what a signature covers.

use baton_protocol::trust::{
    MAX_TRUST_BYTES, NamePattern, PublisherGrant, RootSignature, SignedTrust, TrustError,
};
use baton_protocol::{KeyId, PublicKey};

/// A cursor over postcard-encoded bytes (also used for revocation lists).
pub(crate) struct Reader<'a> {
    /// What is left to read.
    pub(crate) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], TrustError> {
        if self.bytes.len() < n {
            return Err(TrustError::Malformed);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// The next `N` bytes as an array.
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], TrustError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// The next byte.
    pub(crate) fn byte(&mut self) -> Result<u8, TrustError> {
        Ok(self.take(1)?[0])
    }

    /// postcard's varint (LEB128, at most 10 bytes for a u64).
    pub(crate) fn varint(&mut self) -> Result<u64, TrustError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7F);
            if i == 9 && b > 1 {
                return Err(TrustError::Malformed);
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(TrustError::Malformed)
    }

    /// A sequence length, at most `max`.
    pub(crate) fn len(&mut self, max: usize) -> Result<usize, TrustError> {
        let n = self.varint()?;
        if n > max as u64 {
            return Err(TrustError::Malformed);
        }
        Ok(n as usize)
    }
}

/// Decodes the postcard bytes of a [`SignedTrust`] into `out` (its previous contents are
/// replaced); the same bytes [`SignedTrust::decode`] accepts, and the same errors.
pub fn decode_into(bytes: &[u8], out: &mut SignedTrust) -> Result<(), TrustError> {
    if bytes.len() > MAX_TRUST_BYTES {
        return Err(TrustError::Malformed);
    }
    let mut r = Reader { bytes };
    let doc = &mut out.document;
    doc.version = r.varint()?;
    doc.expires = r.varint()?;
    doc.threshold = r.byte()?;
    doc.roots.clear();
    for _ in 0..r.len(doc.roots.capacity())? {
        let key = PublicKey(r.array()?);
        doc.roots.push(key).map_err(|_| TrustError::Malformed)?;
    }
    doc.publishers.clear();
    for _ in 0..r.len(doc.publishers.capacity())? {
        let key = PublicKey(r.array()?);
        doc.publishers
            .push(PublisherGrant {
                key,
                names: heapless::Vec::new(),
            })
            .map_err(|_| TrustError::Malformed)?;
        let grant = doc.publishers.last_mut().ok_or(TrustError::Malformed)?;
        for _ in 0..r.len(grant.names.capacity())? {
            let n = r.len(usize::MAX)?;
            let text = core::str::from_utf8(r.take(n)?).map_err(|_| TrustError::Malformed)?;
            let name = NamePattern::try_from(text).map_err(|_| TrustError::Malformed)?;
            grant.names.push(name).map_err(|_| TrustError::Malformed)?;
        }
    }
    out.signatures.clear();
    for _ in 0..r.len(out.signatures.capacity())? {
        let signer = KeyId(r.array()?);
        let signature: [u8; 64] = r.array()?;
        out.signatures
            .push(RootSignature { signer, signature })
            .map_err(|_| TrustError::Malformed)?;
    }
    if !r.bytes.is_empty() {
        return Err(TrustError::Malformed);
    }
    Ok(())
}

/// An empty signed document: the value [`decode_into`] fills.
pub fn empty() -> SignedTrust {
    SignedTrust::new(baton_protocol::trust::TrustDocument {
        version: 0,
        expires: 0,
        threshold: 0,
        roots: heapless::Vec::new(),
        publishers: heapless::Vec::new(),
    })
}

#[cfg(test)]
mod test {
    extern crate std;
    use std::vec::Vec;

    use baton_protocol::identity::Identity;
    use baton_protocol::manifest::MAX_CONTENT_NAME;
    use baton_protocol::trust::{
        MAX_NAME_PATTERNS, MAX_ROOT_KEYS, MAX_TRUSTED_PUBLISHERS, TrustDocument,
    };

    use super::*;

    fn encoded(s: &SignedTrust) -> Vec<u8> {
        let mut buf = [0u8; MAX_TRUST_BYTES];
        s.encode(&mut buf).unwrap().to_vec()
    }

    fn sample(i: u64) -> SignedTrust {
        let roots: Vec<Identity> = (0..(i % 4 + 1) as u8)
            .map(|k| Identity::from_seed([k + 1; 32]))
            .collect();
        let name = |j: u64| {
            let text = std::format!("n{j}-{}", "é".repeat((i as usize * 7 + j as usize) % 20));
            NamePattern::try_from(text.as_str()).unwrap()
        };
        let mut s = SignedTrust::new(TrustDocument {
            version: i * 0x1_0000_0001,
            expires: if i.is_multiple_of(2) { 0 } else { u64::MAX - i },
            threshold: (i % 3) as u8 + 1,
            roots: roots.iter().map(|r| r.public()).collect(),
            publishers: (0..i % 5)
                .map(|p| PublisherGrant {
                    key: Identity::from_seed([p as u8 + 50; 32]).public(),
                    names: (0..p % 4 + 1).map(name).collect(),
                })
                .collect(),
        });
        for r in &roots {
            s.sign(r).unwrap();
        }
        s
    }

    #[test]
    fn decodes_what_serde_decodes() {
        let mut out = empty();
        for i in 0..40 {
            let s = sample(i);
            let bytes = encoded(&s);
            decode_into(&bytes, &mut out).unwrap();
            assert_eq!(out, s, "{i}");
            assert_eq!(SignedTrust::decode(&bytes), Ok(out.clone()));
        }
        // The largest document.
        let long = NamePattern::try_from("x".repeat(MAX_CONTENT_NAME).as_str()).unwrap();
        let mut big = SignedTrust::new(TrustDocument {
            version: u64::MAX,
            expires: u64::MAX,
            threshold: MAX_ROOT_KEYS as u8,
            roots: (0..MAX_ROOT_KEYS as u8)
                .map(|k| PublicKey([k; 32]))
                .collect(),
            publishers: (0..MAX_TRUSTED_PUBLISHERS as u8)
                .map(|p| PublisherGrant {
                    key: PublicKey([p + 9; 32]),
                    names: core::iter::repeat_n(long.clone(), MAX_NAME_PATTERNS).collect(),
                })
                .collect(),
        });
        for k in 0..big.signatures.capacity() as u8 {
            big.signatures
                .push(RootSignature {
                    signer: KeyId([k; 8]),
                    signature: [k; 64],
                })
                .unwrap();
        }
        let bytes = encoded(&big);
        decode_into(&bytes, &mut out).unwrap();
        assert_eq!(out, big);
    }

    #[test]
    fn refuses_what_serde_refuses() {
        let mut out = empty();
        let bytes = encoded(&sample(7));
        // Every truncation, a trailing byte, and every single-byte corruption: both
        // decoders agree on acceptance (and on the value when accepted).
        for n in 0..bytes.len() {
            assert_eq!(
                decode_into(&bytes[..n], &mut out),
                Err(TrustError::Malformed)
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode_into(&long, &mut out), Err(TrustError::Malformed));
        for at in 0..bytes.len() {
            for v in [0x00, 0x05, 0x7F, 0x80, 0xC3, 0xFF] {
                let mut b = bytes.clone();
                b[at] = v;
                let ours = decode_into(&b, &mut out).map(|()| out.clone());
                assert_eq!(ours, SignedTrust::decode(&b), "byte {at} = {v:#x}");
            }
        }
        let too_big = std::vec![0u8; MAX_TRUST_BYTES + 1];
        assert_eq!(decode_into(&too_big, &mut out), Err(TrustError::Malformed));
    }
}
