//! What the agent-core integration tests share: the root key agents pin and the trust
//! document (signed by it) that the fake managers send after `Welcome`.

use baton_protocol::Message;
use baton_protocol::identity::Identity;
use baton_protocol::trust::{
    MAX_TRUST_BYTES, NamePattern, PublisherGrant, SignedTrust, TrustDocument,
};

/// The root key the test agents pin (`--root-key`).
pub fn root() -> Identity {
    Identity::from_seed([0x70; 32])
}

/// `--root-key HEX` for a test agent.
pub fn root_args() -> [String; 2] {
    ["--root-key".into(), hex::encode(root().public().0)]
}

/// The `Trust` message listing `publisher` for every name, version 1, signed by [`root`].
pub fn trust_message(publisher: &Identity) -> Vec<u8> {
    let root = root();
    let mut signed = SignedTrust::new(TrustDocument {
        version: 1,
        expires: 0,
        threshold: 1,
        roots: heapless::Vec::from_slice(&[root.public()]).unwrap(),
        publishers: heapless::Vec::from_slice(&[PublisherGrant {
            key: publisher.public(),
            names: heapless::Vec::from_slice(&[NamePattern::try_from("*").unwrap()]).unwrap(),
        }])
        .unwrap(),
    });
    signed.sign(&root).unwrap();
    let mut buf = [0u8; MAX_TRUST_BYTES];
    let document = signed.encode(&mut buf).unwrap();
    Message::Trust { document }.to_vec()
}
