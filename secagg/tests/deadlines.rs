//! Stage deadlines: `Server::tick` closes a stage when everyone expected answered or its
//! deadline passed; a site that misses one is dropped from then on and its late message is
//! refused, and the round still unmasks the others' sum exactly.

use chacha20::ChaCha20Rng;
use fedee_secagg::{Closed, Deadlines, Error, RoundParams, Server, Site, SiteIndex};
use rand_core::SeedableRng;

const D: Deadlines = Deadlines {
    advertise_s: 10,
    share_keys_s: 10,
    masked_input_s: 30,
    unmask_s: 10,
};

fn params() -> RoundParams {
    RoundParams {
        context: [2; 32],
        round: 7,
        sites: 6,
        degree: 5,
        threshold: 4,
        dim: 8,
    }
}

fn input(i: SiteIndex) -> Vec<u32> {
    (0..8).map(|j| 1000 * u32::from(i) + j).collect()
}

/// Site 5 misses the advertise deadline, site 2 the masked-input deadline; site 3 answers the
/// unmask stage late. The clock is the caller's, in seconds.
#[test]
fn late_sites_are_dropped_and_the_rest_is_summed() {
    let p = params();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut server = Server::new(p.clone()).unwrap();
    server.open_stage_at(100);
    let (mut sites, adverts): (Vec<Site>, Vec<_>) = (0..6)
        .map(|i| Site::new(p.clone(), i, &mut rng).unwrap())
        .unzip();
    for (i, a) in adverts.iter().enumerate().take(5) {
        server.receive_advertise(i as SiteIndex, a.clone()).unwrap();
    }
    assert_eq!(
        server.tick(105, &D).unwrap(),
        None,
        "waits for site 5 until its deadline"
    );
    let Some(Closed::Roster(roster)) = server.tick(110, &D).unwrap() else {
        panic!("the advertise stage closes at its deadline")
    };
    assert_eq!(roster.sites.len(), 5);
    let late = server
        .receive_advertise(5, adverts[5].clone())
        .unwrap_err()
        .to_string();
    assert!(late.contains("deadline has passed"), "{late}");
    // Everyone in the roster shares keys at once: the stage closes without waiting.
    for (i, s) in sites.iter_mut().enumerate().take(5) {
        server
            .receive_shares(i as SiteIndex, s.share_keys(&roster, &mut rng).unwrap())
            .unwrap();
    }
    assert_eq!(server.tick(111, &D).unwrap(), Some(Closed::SharesRouted));
    for (i, s) in sites.iter_mut().enumerate().take(5) {
        if i == 2 {
            continue;
        }
        let y = s
            .masked_input(&server.shares_for(i as SiteIndex), &input(i as SiteIndex))
            .unwrap();
        server.receive_masked(i as SiteIndex, &y).unwrap();
    }
    assert_eq!(server.tick(140, &D).unwrap(), None);
    let Some(Closed::Unmask(req)) = server.tick(141, &D).unwrap() else {
        panic!("the masked-input stage closes at its deadline")
    };
    assert_eq!(
        (req.alive.clone(), req.dropped.clone()),
        (vec![0, 1, 3, 4], vec![2])
    );
    let y2 = sites[2]
        .masked_input(&server.shares_for(2), &input(2))
        .unwrap();
    assert!(
        server
            .receive_masked(2, &y2)
            .unwrap_err()
            .to_string()
            .contains("deadline has passed")
    );
    for i in [0, 1, 4] {
        server
            .receive_unmask(i, sites[usize::from(i)].unmask(&req).unwrap())
            .unwrap();
    }
    // Three answers would rebuild every secret, but the stage waits for site 3 …
    assert_eq!(server.tick(145, &D).unwrap(), None);
    server
        .receive_unmask(3, sites[3].unmask(&req).unwrap())
        .unwrap();
    // … and closes as soon as every alive site answered.
    let Some(Closed::Sum(sum)) = server.tick(146, &D).unwrap() else {
        panic!("the unmask stage closes when every alive site answered")
    };
    let want: Vec<u32> = (0..8u32)
        .map(|j| [0u32, 1, 3, 4].iter().map(|i| 1000 * i + j).sum())
        .collect();
    assert_eq!(sum, want);
    assert_eq!(
        server.tick(200, &D).unwrap(),
        None,
        "a finished round stays finished"
    );
}

/// At the unmask deadline with too few answers for some secret, the round aborts with no
/// output.
#[test]
fn too_few_unmask_answers_at_the_deadline_abort() {
    let p = params();
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut server = Server::new(p.clone()).unwrap();
    let (mut sites, adverts): (Vec<Site>, Vec<_>) = (0..6)
        .map(|i| Site::new(p.clone(), i, &mut rng).unwrap())
        .unzip();
    for (i, a) in adverts.into_iter().enumerate() {
        server.receive_advertise(i as SiteIndex, a).unwrap();
    }
    let Some(Closed::Roster(roster)) = server.tick(0, &D).unwrap() else {
        panic!()
    };
    for (i, s) in sites.iter_mut().enumerate() {
        server
            .receive_shares(i as SiteIndex, s.share_keys(&roster, &mut rng).unwrap())
            .unwrap();
    }
    server.tick(1, &D).unwrap();
    for (i, s) in sites.iter_mut().enumerate() {
        let y = s
            .masked_input(&server.shares_for(i as SiteIndex), &input(i as SiteIndex))
            .unwrap();
        server.receive_masked(i as SiteIndex, &y).unwrap();
    }
    let Some(Closed::Unmask(req)) = server.tick(2, &D).unwrap() else {
        panic!()
    };
    for i in [0, 1, 2] {
        server
            .receive_unmask(i, sites[usize::from(i)].unmask(&req).unwrap())
            .unwrap();
    }
    assert_eq!(server.tick(11, &D).unwrap(), None);
    match server.tick(12, &D) {
        Err(Error::TooFew {
            have: 3,
            threshold: 4,
            ..
        }) => {}
        other => panic!("3 answers of threshold 4 must abort, got {other:?}"),
    }
}
