//! What `Status` shows to whom. Operator certificates (and insecure mode, which has no
//! identities) see every site's figures; any other certificate of the consortium (a site,
//! the key holder's client) sees the federation's: weighted metrics, the rounds, the spec,
//! the selected model and the pooled statistics, but no site's metrics, privacy spend or
//! reason for leaving.

use fedee_proto::v1::{SiteMetric, StatusResponse};

/// The sites' metrics weighted by their test examples (validation accuracy by their
/// validation examples); each optional metric over the sites that reported it. `None`
/// without metrics.
pub fn weighted(ms: &[SiteMetric]) -> Option<SiteMetric> {
    if ms.is_empty() {
        return None;
    }
    let mean = |get: &dyn Fn(&SiteMetric) -> Option<f64>, weight: &dyn Fn(&SiteMetric) -> u64| {
        let (mut sum, mut n) = (0.0, 0u64);
        for m in ms {
            if let Some(v) = get(m) {
                sum += v * weight(m) as f64;
                n = n.saturating_add(weight(m));
            }
        }
        (n > 0).then(|| sum / n as f64)
    };
    let test = |m: &SiteMetric| m.num_test_examples;
    let validation = |m: &SiteMetric| m.num_validation_examples;
    Some(SiteMetric {
        site: "weighted".into(),
        test_accuracy: mean(&|m| Some(m.test_accuracy), &test).unwrap_or(0.0),
        num_test_examples: ms.iter().map(test).fold(0, u64::saturating_add),
        balanced_accuracy: mean(&|m| m.balanced_accuracy, &test),
        macro_f1: mean(&|m| m.macro_f1, &test),
        auroc: mean(&|m| m.auroc, &test),
        validation_accuracy: mean(&|m| m.validation_accuracy, &validation),
        num_validation_examples: ms.iter().map(validation).fold(0, u64::saturating_add),
    })
}

/// The federation's view of a full status: per-site figures removed.
pub fn federation_view(mut st: StatusResponse) -> StatusResponse {
    for r in &mut st.rounds {
        r.site_metrics.clear();
    }
    st.site_privacy.clear();
    for d in &mut st.departed {
        // "site: reason" → "site"
        if let Some((site, _)) = d.split_once(": ") {
            *d = site.to_owned();
        }
    }
    st.per_site = false;
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(site: &str, acc: f64, n: u64, auroc: Option<f64>) -> SiteMetric {
        SiteMetric {
            site: site.into(),
            test_accuracy: acc,
            num_test_examples: n,
            auroc,
            validation_accuracy: Some(acc / 2.0),
            num_validation_examples: n / 2,
            ..SiteMetric::default()
        }
    }

    #[test]
    fn weighted_metrics_weigh_by_examples_over_the_sites_that_report_them() {
        let w = weighted(&[m("a", 1.0, 30, Some(0.8)), m("b", 0.5, 10, None)]).unwrap();
        assert!((w.test_accuracy - 0.875).abs() < 1e-12);
        assert_eq!(w.num_test_examples, 40);
        assert_eq!(w.auroc, Some(0.8), "only a reported AUROC");
        assert!((w.validation_accuracy.unwrap() - 0.4375).abs() < 1e-12);
        assert_eq!(w.balanced_accuracy, None);
        assert!(weighted(&[]).is_none());
    }

    #[test]
    fn the_federation_view_hides_every_sites_figures() {
        let full = StatusResponse {
            rounds: vec![fedee_proto::v1::RoundStatus {
                site_metrics: vec![m("a", 1.0, 30, None)],
                weighted: weighted(&[m("a", 1.0, 30, None)]),
                ..Default::default()
            }],
            site_privacy: vec![fedee_proto::v1::SitePrivacy {
                site: "a".into(),
                ..Default::default()
            }],
            departed: vec!["b: privacy budget: site `b` has spent ε = 0.9".into()],
            per_site: true,
            ..Default::default()
        };
        let v = federation_view(full);
        assert!(v.rounds[0].site_metrics.is_empty() && v.rounds[0].weighted.is_some());
        assert!(v.site_privacy.is_empty());
        assert_eq!(v.departed, vec!["b".to_owned()]);
        assert!(!v.per_site);
    }
}
