//! Per-tenant fairness with virtual token counters (VTC, Sheng et al., "Fairness in Serving
//! Large Language Models", OSDI '24): each tenant's counter grows with the service it receives
//! (prompt tokens weighted `w_in`, generated tokens `w_out`); among tenants with waiting work the
//! one with the smallest counter is admitted next. A tenant that was idle is lifted to the
//! smallest counter of the active tenants when it returns, so idleness banks no credit.

use std::collections::HashMap;

use crate::lora::ids::TenantId;

#[derive(Debug, Clone)]
pub struct Vtc {
    counters: HashMap<TenantId, f64>,
    w_in: f64,
    w_out: f64,
}

impl Default for Vtc {
    fn default() -> Self {
        Vtc {
            counters: HashMap::new(),
            w_in: 1.0,
            w_out: 2.0,
        }
    }
}

impl Vtc {
    /// A tenant with newly waiting work: lift it to the smallest counter among `active`
    /// tenants (those with queued or running work) if it is below that.
    pub fn on_arrival<'a>(
        &mut self,
        tenant: &TenantId,
        active: impl Iterator<Item = &'a TenantId>,
    ) {
        let floor = active
            .filter(|t| *t != tenant)
            .filter_map(|t| self.counters.get(t))
            .copied()
            .fold(f64::INFINITY, f64::min);
        let c = self.counters.entry(tenant.clone()).or_insert(0.0);
        if floor.is_finite() && *c < floor {
            *c = floor;
        }
    }

    /// Charges service to a tenant.
    pub fn charge(&mut self, tenant: &TenantId, prompt_tokens: usize, output_tokens: usize) {
        *self.counters.entry(tenant.clone()).or_insert(0.0) +=
            self.w_in * prompt_tokens as f64 + self.w_out * output_tokens as f64;
    }

    pub fn counter(&self, tenant: &TenantId) -> f64 {
        self.counters.get(tenant).copied().unwrap_or(0.0)
    }

    /// Of `candidates`, the tenant to serve next (smallest counter, ties by name).
    pub fn pick<'a>(&self, candidates: impl Iterator<Item = &'a TenantId>) -> Option<&'a TenantId> {
        candidates.min_by(|a, b| {
            self.counter(a)
                .total_cmp(&self.counter(b))
                .then_with(|| a.cmp(b))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId(s.to_owned())
    }

    #[test]
    fn serves_the_least_served_and_lifts_returning_tenants() {
        let mut v = Vtc::default();
        v.charge(&t("a"), 100, 10);
        assert_eq!(v.counter(&t("a")), 120.0);
        let (a, b) = (t("a"), t("b"));
        assert_eq!(v.pick([&a, &b].into_iter()), Some(&b));
        v.charge(&b, 200, 0);
        assert_eq!(v.pick([&a, &b].into_iter()), Some(&a));
        // c was idle: it may not jump ahead by the whole history.
        let c = t("c");
        v.on_arrival(&c, [&a, &b].into_iter());
        assert_eq!(v.counter(&c), 120.0);
    }
}
