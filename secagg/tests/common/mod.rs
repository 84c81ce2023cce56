//! Shared by the secure-aggregation tests.

use fedee_secagg::{RoundParams, Server, Site, SiteIndex};

/// Runs stages 1 and 2 for every site of `p` (no dropouts): the server waits for masked
/// inputs, each site for its shares.
pub fn to_masked_stage(
    p: &RoundParams,
    rng: &mut impl rand_core::CryptoRng,
) -> (Server, Vec<Site>) {
    let mut server = Server::new(p.clone()).unwrap();
    let mut sites: Vec<Site> = (0..p.sites as SiteIndex)
        .map(|i| {
            let (s, a) = Site::new(p.clone(), i, &mut *rng).unwrap();
            server.receive_advertise(i, a).unwrap();
            s
        })
        .collect();
    let roster = server.close_advertise().unwrap();
    for (i, s) in sites.iter_mut().enumerate() {
        server
            .receive_shares(i as SiteIndex, s.share_keys(&roster, &mut *rng).unwrap())
            .unwrap();
    }
    server.close_shares().unwrap();
    (server, sites)
}
