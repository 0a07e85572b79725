//! How a cluster picks one of its endpoints (Envoy's `lb_policy`, DestinationRule's
//! `loadBalancer`): round robin, random, least request (the less loaded of two drawn at
//! random, loaded meaning requests waiting for their response), peak EWMA (the cheaper of
//! two drawn at random, the cost being the endpoint's latency estimate times its requests in
//! flight plus one: Linkerd's balancer, Lumen's default), and the consistent hashes
//! that give session affinity, a ring (RING_HASH) or Maglev's table (MAGLEV), looked up with
//! a hash of the request (the route's hash policy: a header, a cookie, the source IP or a
//! query parameter; see `stack/route.rs`). The tables are built, as Envoy builds them, from
//! xxHash64 of each endpoint's address, once per endpoint set.
//!
//! Outlier detection (Envoy's `outlier_detection`, Istio's `outlierDetection`) lives here
//! too: an endpoint that answers N 5xx (or N gateway errors: 502, 503, 504, or no connection)
//! in a row is ejected for the base ejection time times the number of times it has been
//! ejected, as long as no more than the allowed share of endpoints is out (at least one may
//! always be); every policy then picks among the others, and among all of them when fewer
//! healthy remain than the panic threshold (all ejected, by default).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use twox_hash::XxHash64;

/// A cluster's policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    Random,
    /// Power of two choices on requests in flight (Envoy's default `choice_count` of 2).
    LeastRequest,
    RingHash {
        minimum_ring_size: u64,
    },
    Maglev {
        table_size: u64,
    },
    /// Power of two choices on a latency estimate that jumps up to a slower response at once
    /// and decays towards faster ones (and towards zero while idle) over `decay`, times the
    /// requests in flight plus one; an endpoint not yet measured is taken at `default_rtt`.
    PeakEwma {
        decay: Duration,
        default_rtt: Duration,
    },
}

impl LbPolicy {
    /// Peak EWMA with Linkerd's defaults: a 10 s decay, 30 ms for an endpoint not measured.
    pub const PEAK_EWMA: LbPolicy = LbPolicy::PeakEwma {
        decay: Duration::from_secs(10),
        default_rtt: Duration::from_millis(30),
    };

    /// Whether the policy reads requests in flight (the balance layer counts them only then).
    pub fn counts_in_flight(self) -> bool {
        matches!(self, LbPolicy::LeastRequest | LbPolicy::PeakEwma { .. })
    }
}

impl LbPolicy {
    /// Whether requests need a hash to be balanced as configured.
    pub fn hashes(self) -> bool {
        matches!(self, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. })
    }
}

/// The largest ring or table built, whatever the configuration asks (Envoy caps rings at
/// 8M entries; Maglev's table size is bounded by the control plane's validation).
const MAX_TABLE: u64 = 8 * 1024 * 1024;

/// xxHash64 with seed 0 (Envoy's `HashUtil::xxHash64`).
pub fn hash(bytes: &[u8]) -> u64 {
    XxHash64::oneshot(0, bytes)
}

/// When endpoints are ejected (Envoy's `OutlierDetection`; a count of zero disables its
/// kind of failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints (percent), ejections are ignored.
    pub panic_threshold_percent: u32,
}

/// What an attempt to an endpoint came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No response: the connection failed, was reset or timed out (a gateway error).
    NoResponse,
}

#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since the balancer's epoch until which the endpoint is out (0: in).
    ejected_until: AtomicU64,
    ejections: AtomicU32,
}

/// An endpoint's latency estimate (peak EWMA), in nanoseconds, as of `at`.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    rtt_ns: f64,
    at: Instant,
    /// Whether a response has been timed yet (before: the default RTT, or a measured
    /// rival's estimate, see [`Balancer::pick`]).
    measured: bool,
}

impl Estimate {
    /// The estimate decayed to `now` (towards zero: an idle endpoint is tried again).
    fn decayed(&self, now: Instant, decay: Duration) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
        self.rtt_ns * (-elapsed / decay.as_nanos().max(1) as f64).exp()
    }

    /// Takes in one measured latency: a slower one at once (the peak), a faster one blended
    /// in by how long it has been since the last.
    fn observe(&mut self, rtt: Duration, now: Instant, decay: Duration) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.rtt_ns || !self.measured {
            self.rtt_ns = rtt;
            self.measured = true;
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
            let w = (-elapsed / decay.as_nanos().max(1) as f64).exp();
            self.rtt_ns = self.rtt_ns * w + rtt * (1.0 - w);
        }
        self.at = now;
    }
}

/// The state a cluster's policy keeps over its endpoints.
#[derive(Debug, Default)]
pub struct Balancer {
    cursor: AtomicUsize,
    /// Requests sent to each endpoint whose response has not come yet.
    active: Box<[AtomicU32]>,
    /// Peak EWMA's latency estimates, one per endpoint (empty for other policies).
    estimates: Box<[std::sync::Mutex<Estimate>]>,
    table: Table,
    outlier: Option<OutlierPolicy>,
    health: Box<[Health]>,
    epoch: Option<Instant>,
}

#[derive(Debug, Default)]
enum Table {
    #[default]
    None,
    /// Points on the ring, sorted by hash, each naming an endpoint.
    Ring(Vec<(u64, u32)>),
    /// Maglev's lookup table: entry → endpoint.
    Maglev(Vec<u32>),
}

impl Balancer {
    /// The state for `policy` over endpoints with these addresses (their order is the
    /// endpoints' order).
    pub fn new(policy: LbPolicy, addresses: &[String]) -> Balancer {
        Balancer::with_outlier_detection(policy, addresses, None)
    }

    /// As [`Balancer::new`], ejecting endpoints as `outlier` says.
    pub fn with_outlier_detection(
        policy: LbPolicy,
        addresses: &[String],
        outlier: Option<OutlierPolicy>,
    ) -> Balancer {
        let table = match policy {
            _ if addresses.is_empty() => Table::None,
            LbPolicy::RingHash { minimum_ring_size } => Table::Ring(ring(
                addresses,
                minimum_ring_size.clamp(1, MAX_TABLE) as usize,
            )),
            LbPolicy::Maglev { table_size } => {
                Table::Maglev(maglev(addresses, table_size.clamp(1, MAX_TABLE) as usize))
            }
            _ => Table::None,
        };
        let estimates = match policy {
            LbPolicy::PeakEwma { default_rtt, .. } => {
                let now = Instant::now();
                addresses
                    .iter()
                    .map(|_| {
                        std::sync::Mutex::new(Estimate {
                            rtt_ns: default_rtt.as_nanos() as f64,
                            at: now,
                            measured: false,
                        })
                    })
                    .collect()
            }
            _ => Box::default(),
        };
        Balancer {
            cursor: AtomicUsize::new(0),
            active: addresses.iter().map(|_| AtomicU32::new(0)).collect(),
            estimates,
            table,
            outlier,
            health: addresses.iter().map(|_| Health::default()).collect(),
            epoch: outlier.map(|_| Instant::now()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.map_or(0, |e| {
            e.elapsed().as_millis().try_into().unwrap_or(u64::MAX)
        })
    }

    /// Whether endpoint `index` is ejected now.
    pub fn ejected(&self, index: usize) -> bool {
        self.health
            .get(index)
            .is_some_and(|h| h.ejected_until.load(Ordering::Relaxed) > self.now_ms())
    }

    fn ejected_count(&self) -> usize {
        (0..self.health.len()).filter(|i| self.ejected(*i)).count()
    }

    /// Whether the picks should steer around ejected endpoints: some are out, and enough
    /// are in (the panic threshold).
    fn steering(&self, n: usize) -> bool {
        let Some(policy) = self.outlier else {
            return false;
        };
        let out = self.ejected_count();
        let healthy = n.saturating_sub(out);
        out > 0 && healthy > 0 && healthy * 100 >= n * policy.panic_threshold_percent as usize
    }

    /// Records what an attempt to endpoint `index` came to; ejects it when that makes too
    /// many failures in a row. Returns whether this ejected it.
    pub fn observe(&self, index: usize, outcome: Outcome) -> bool {
        let (Some(policy), Some(h)) = (self.outlier, self.health.get(index)) else {
            return false;
        };
        let (five, gateway) = match outcome {
            Outcome::Status(s) if s >= 500 => (true, matches!(s, 502..=504)),
            Outcome::Status(_) => (false, false),
            Outcome::NoResponse => (true, true),
        };
        if !five {
            h.consecutive_5xx.store(0, Ordering::Relaxed);
            h.consecutive_gateway.store(0, Ordering::Relaxed);
            return false;
        }
        let fives = h.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        let gateways = if gateway {
            h.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            h.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let tripped = (policy.consecutive_5xx > 0 && fives >= policy.consecutive_5xx)
            || (policy.consecutive_gateway > 0 && gateways >= policy.consecutive_gateway);
        if !tripped || self.ejected(index) {
            return false;
        }
        // No more than the allowed share out, but always at least one.
        let n = self.health.len();
        let out = self.ejected_count();
        if out > 0 && (out + 1) * 100 > n * policy.max_ejection_percent as usize {
            return false;
        }
        let times = h.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = policy
            .base_ejection
            .saturating_mul(times)
            .min(policy.max_ejection.max(policy.base_ejection));
        let until = self.now_ms() + length.as_millis().try_into().unwrap_or(u64::MAX / 2);
        h.ejected_until.store(until, Ordering::Relaxed);
        h.consecutive_5xx.store(0, Ordering::Relaxed);
        h.consecutive_gateway.store(0, Ordering::Relaxed);
        true
    }

    /// The index of the endpoint (of `n`) for a request with `request_hash` (a hashing
    /// policy without one falls back to random, as Envoy does); `None` when there are none.
    pub fn pick(&self, policy: LbPolicy, n: usize, request_hash: Option<u64>) -> Option<usize> {
        if n == 0 {
            return None;
        }
        let index = match (policy, &self.table, request_hash) {
            (LbPolicy::RoundRobin, _, _) => self.cursor.fetch_add(1, Ordering::Relaxed),
            (LbPolicy::LeastRequest, _, _) if n > 1 && self.active.len() == n => {
                let (a, b) = two_of(n);
                let load = |i: usize| self.active[i].load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
            (LbPolicy::PeakEwma { decay, .. }, _, _)
                if n > 1 && self.estimates.len() == n && self.active.len() == n =>
            {
                let (a, b) = two_of(n);
                let now = Instant::now();
                let estimate = |i: usize| {
                    self.estimates[i]
                        .lock()
                        .map_or((0.0, false), |e| (e.decayed(now, decay), e.measured))
                };
                let (ea, eb) = (estimate(a), estimate(b));
                // An endpoint not timed yet is taken at the default, or at its rival's
                // estimate when that is lower: a new endpoint shares the traffic of a fast
                // cluster until it is measured, rather than waiting out a default slower
                // than the cluster is, and is preferred to a slow one.
                let (ra, rb) = match (ea, eb) {
                    ((ra, false), (rb, true)) => (ra.min(rb), rb),
                    ((ra, true), (rb, false)) => (ra, rb.min(ra)),
                    ((ra, _), (rb, _)) => (ra, rb),
                };
                let load = |i: usize| f64::from(self.active[i].load(Ordering::Relaxed) + 1);
                if rb * load(b) < ra * load(a) { b } else { a }
            }
            (_, Table::Ring(points), Some(h)) => {
                let at = points.partition_point(|(p, _)| *p < h);
                points
                    .get(at)
                    .or(points.first())
                    .map_or(0, |(_, e)| *e as usize)
            }
            (_, Table::Maglev(entries), Some(h)) => {
                entries[(h % entries.len() as u64) as usize] as usize
            }
            _ => rand::random::<u32>() as usize,
        };
        let index = index % n;
        // Around ejected endpoints: the next one that is in (a ring's next host, the next in
        // turn), unless too few are in.
        if self.steering(n) && self.ejected(index) {
            return (1..n).map(|k| (index + k) % n).find(|i| !self.ejected(*i));
        }
        Some(index)
    }

    /// Takes over what `old` learnt about the endpoints both have (matched by address, as
    /// `old_addresses` and `addresses` list them): ejections still running and their count,
    /// failures in a row, and latency estimates. Requests in flight stay counted on `old`,
    /// whose guards they hold. An endpoint update (EDS) thus neither lets an ejected endpoint
    /// back in early nor makes a slow one look new.
    pub fn carry_from(&self, old: &Balancer, old_addresses: &[String], addresses: &[String]) {
        let before: std::collections::HashMap<&str, usize> = old_addresses
            .iter()
            .enumerate()
            .map(|(i, a)| (a.as_str(), i))
            .collect();
        let (old_now, now) = (old.now_ms(), self.now_ms());
        for (i, address) in addresses.iter().enumerate() {
            let Some(&j) = before.get(address.as_str()) else {
                continue;
            };
            if let (Some(h), Some(o)) = (self.health.get(i), old.health.get(j)) {
                let remaining = o
                    .ejected_until
                    .load(Ordering::Relaxed)
                    .saturating_sub(old_now);
                if remaining > 0 && self.epoch.is_some() {
                    h.ejected_until.store(now + remaining, Ordering::Relaxed);
                }
                for (to, from) in [
                    (&h.consecutive_5xx, &o.consecutive_5xx),
                    (&h.consecutive_gateway, &o.consecutive_gateway),
                    (&h.ejections, &o.ejections),
                ] {
                    to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
                }
            }
            if let (Some(to), Some(from)) = (self.estimates.get(i), old.estimates.get(j))
                && let (Ok(mut to), Ok(from)) = (to.lock(), from.lock())
            {
                *to = *from;
            }
        }
    }

    /// Counts a request to endpoint `index` as in flight until the guard drops (and, under
    /// peak EWMA, takes the time it took as a latency measure then).
    pub fn start(self: &Arc<Self>, index: usize, policy: LbPolicy) -> Option<InFlight> {
        let slot = self.active.get(index)?;
        slot.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            balancer: self.clone(),
            index,
            measure: match policy {
                LbPolicy::PeakEwma { decay, .. } => Some((Instant::now(), decay)),
                _ => None,
            },
        })
    }

    /// Peak EWMA's current latency estimate for endpoint `index`.
    pub fn estimate(&self, index: usize, decay: Duration) -> Option<Duration> {
        let e = self.estimates.get(index)?.lock().ok()?;
        Some(Duration::from_nanos(e.decayed(Instant::now(), decay) as u64))
    }

    /// Requests in flight to endpoint `index`.
    pub fn active(&self, index: usize) -> u32 {
        self.active
            .get(index)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }
}

/// Two distinct endpoints of `n` (> 1), drawn at random.
fn two_of(n: usize) -> (usize, usize) {
    let a = rand::random_range(0..n);
    // A second draw among the others, so the two are distinct.
    let b = (a + 1 + rand::random_range(0..n - 1)) % n;
    (a, b)
}

/// A request in flight to one endpoint (least request's and peak EWMA's measure of load);
/// under peak EWMA, when it started, for the latency measure its end makes.
#[derive(Debug)]
pub struct InFlight {
    balancer: Arc<Balancer>,
    index: usize,
    measure: Option<(Instant, Duration)>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(slot) = self.balancer.active.get(self.index) {
            slot.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some((started, decay)) = self.measure
            && let Some(Ok(mut e)) = self.balancer.estimates.get(self.index).map(|m| m.lock())
        {
            let now = Instant::now();
            e.observe(now.saturating_duration_since(started), now, decay);
        }
    }
}

/// Envoy's ring: each endpoint hashed `ceil(size / endpoints)` times as `"<address>_<i>"`.
fn ring(addresses: &[String], minimum_size: usize) -> Vec<(u64, u32)> {
    let per_endpoint = minimum_size.div_ceil(addresses.len()).max(1);
    let mut points = Vec::with_capacity(per_endpoint * addresses.len());
    let mut key = String::new();
    for (e, address) in addresses.iter().enumerate() {
        for i in 0..per_endpoint {
            key.clear();
            key.push_str(address);
            key.push('_');
            key.push_str(&i.to_string());
            points.push((hash(key.as_bytes()), e as u32));
        }
    }
    points.sort_unstable();
    points
}

/// Maglev's table (Eisenbud et al., NSDI 2016): each endpoint walks its own permutation of
/// the entries (offset and skip from two hashes of its address) and takes the next free one,
/// in turn, until the table is full; every endpoint gets an equal share within one entry.
fn maglev(addresses: &[String], size: usize) -> Vec<u32> {
    const EMPTY: u32 = u32::MAX;
    let m = size as u64;
    let perms: Vec<(u64, u64)> = addresses
        .iter()
        .map(|a| {
            let offset = hash(a.as_bytes()) % m;
            let skip = if m > 1 {
                XxHash64::oneshot(1, a.as_bytes()) % (m - 1) + 1
            } else {
                1
            };
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; addresses.len()];
    let mut table = vec![EMPTY; size];
    let mut filled = 0;
    'fill: loop {
        for (e, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[e] * skip) % m;
            while table[c as usize] != EMPTY {
                next[e] += 1;
                c = (offset + next[e] * skip) % m;
            }
            table[c as usize] = e as u32;
            next[e] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8080")).collect()
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let b = Balancer::new(LbPolicy::RoundRobin, &addresses(3));
        let picks: Vec<usize> = (0..6)
            .filter_map(|_| b.pick(LbPolicy::RoundRobin, 3, None))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(b.pick(LbPolicy::RoundRobin, 0, None), None);
    }

    #[test]
    fn least_request_avoids_the_loaded_endpoint() {
        let b = Arc::new(Balancer::new(LbPolicy::LeastRequest, &addresses(2)));
        // Endpoint 0 has five requests in flight: with two endpoints, both are always drawn,
        // so every pick is endpoint 1.
        let held: Vec<InFlight> = (0..5)
            .filter_map(|_| b.start(0, LbPolicy::LeastRequest))
            .collect();
        assert_eq!(b.active(0), 5);
        for _ in 0..100 {
            assert_eq!(b.pick(LbPolicy::LeastRequest, 2, None), Some(1));
        }
        drop(held);
        assert_eq!(b.active(0), 0, "the guards give their slots back");
    }

    #[test]
    fn least_request_among_many_never_picks_the_most_loaded() {
        let b = Arc::new(Balancer::new(LbPolicy::LeastRequest, &addresses(4)));
        let _held: Vec<InFlight> = (0..3)
            .filter_map(|_| b.start(2, LbPolicy::LeastRequest))
            .collect();
        // Two distinct draws: the loaded one can only win against... nobody.
        for _ in 0..500 {
            assert_ne!(b.pick(LbPolicy::LeastRequest, 4, None), Some(2));
        }
    }

    #[test]
    fn peak_ewma_jumps_to_a_slow_answer_decays_after_and_steers_away_from_it() {
        let decay = Duration::from_secs(10);
        let policy = LbPolicy::PeakEwma {
            decay,
            default_rtt: Duration::from_millis(30),
        };
        // The estimate: a slower answer is taken at once, a faster one blended in by how
        // long it has been, and an idle endpoint's decays towards zero.
        let t0 = Instant::now();
        let mut e = Estimate {
            rtt_ns: 30e6,
            at: t0,
            measured: true,
        };
        e.observe(Duration::from_millis(300), t0, decay);
        assert_eq!(e.rtt_ns, 300e6);
        e.observe(Duration::from_millis(1), t0 + decay, decay);
        let after = 300e6 * (-1f64).exp() + 1e6 * (1.0 - (-1f64).exp());
        assert!((e.rtt_ns - after).abs() < 1.0, "{} vs {after}", e.rtt_ns);
        assert!(e.decayed(t0 + decay * 3, decay) < e.rtt_ns * 0.14);
        // The balancer: endpoint 0 answered in 300 ms; once endpoint 1 answered in 30 ms,
        // with two endpoints both are drawn, so 0 is never picked while its estimate is ten
        // times 1's.
        let b = Arc::new(Balancer::new(policy, &addresses(2)));
        if let Ok(mut e0) = b.estimates[0].lock() {
            e0.observe(Duration::from_millis(300), Instant::now(), decay);
        }
        // Endpoint 1 not timed yet: taken at the default (30 ms), below its slow rival, so
        // always preferred...
        for _ in 0..100 {
            assert_eq!(b.pick(policy, 2, None), Some(1));
        }
        // ...where beside a fast one (1 ms) it is taken at the rival's estimate: they share.
        let fast = Balancer::new(policy, &addresses(2));
        if let Ok(mut e0) = fast.estimates[0].lock() {
            e0.observe(Duration::from_millis(1), Instant::now(), decay);
        }
        let picks: Vec<_> = (0..200)
            .filter_map(|_| fast.pick(policy, 2, None))
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
        if let Ok(mut e1) = b.estimates[1].lock() {
            e1.observe(Duration::from_millis(30), Instant::now(), decay);
        }
        for _ in 0..100 {
            assert_eq!(b.pick(policy, 2, None), Some(1));
        }
        // Requests in flight multiply the cost: 11 on endpoint 1 (30 ms × 12 > 300 ms × 1)
        // send the next to endpoint 0.
        let held: Vec<InFlight> = (0..11).filter_map(|_| b.start(1, policy)).collect();
        assert_eq!(b.pick(policy, 2, None), Some(0));
        drop(held);
        // A guard's end is a measure: endpoint 1's estimate took the (short) time it was held.
        assert!(
            b.estimate(1, decay)
                .is_some_and(|d| d < Duration::from_millis(30))
        );
    }

    #[test]
    fn an_endpoint_update_keeps_ejections_and_estimates_of_the_endpoints_that_stay() {
        let policy = LbPolicy::PEAK_EWMA;
        let outlier = Some(OutlierPolicy {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 100,
            panic_threshold_percent: 0,
        });
        let old_addresses = addresses(3);
        let old = Balancer::with_outlier_detection(policy, &old_addresses, outlier);
        assert!(old.observe(1, Outcome::Status(503)), "ejected");
        if let Ok(mut e) = old.estimates[2].lock() {
            e.rtt_ns = 250e6;
        }
        // Endpoint 0 goes, one comes; 1 and 2 stay (now at 0 and 1).
        let new_addresses = vec![
            old_addresses[1].clone(),
            old_addresses[2].clone(),
            "10.0.0.99:80".to_string(),
        ];
        let new = Balancer::with_outlier_detection(policy, &new_addresses, outlier);
        new.carry_from(&old, &old_addresses, &new_addresses);
        assert!(new.ejected(0), "the ejected endpoint stays out");
        assert!(!new.ejected(1) && !new.ejected(2));
        let decay = Duration::from_secs(10);
        assert!(
            new.estimate(1, decay)
                .is_some_and(|d| d > Duration::from_millis(200))
        );
        assert!(
            new.estimate(2, decay)
                .is_some_and(|d| d < Duration::from_millis(31))
        );
    }

    #[test]
    fn a_ring_keeps_keys_on_their_endpoint_and_moves_few_when_one_goes() {
        let policy = LbPolicy::RingHash {
            minimum_ring_size: 1024,
        };
        let four = addresses(4);
        let b = Balancer::new(policy, &four);
        let keys: Vec<u64> = (0..2000)
            .map(|k| hash(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<usize> = keys
            .iter()
            .filter_map(|h| b.pick(policy, 4, Some(*h)))
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .filter_map(|h| b.pick(policy, 4, Some(*h)))
            .collect();
        assert_eq!(before, again, "the same key, the same endpoint");
        let mut share = [0usize; 4];
        for e in &before {
            share[*e] += 1;
        }
        assert!(share.iter().all(|s| *s > 250), "{share:?}");
        // Endpoint 3 goes: its keys move, and of the others only those that land on the
        // points the ring adds to keep its size (342 an endpoint instead of 256, as Envoy
        // sizes it), about one in six; a modulo hash would move three in four.
        let three = Balancer::new(policy, &four[..3]);
        let moved = keys
            .iter()
            .zip(&before)
            .filter(|(h, e)| **e != 3 && three.pick(policy, 3, Some(**h)) != Some(**e))
            .count();
        assert!(
            moved < 2000 / 4,
            "{moved} of 2000 keys of the staying endpoints moved"
        );
    }

    #[test]
    fn maglev_fills_its_table_evenly_and_is_stable() {
        let policy = LbPolicy::Maglev { table_size: 65_537 };
        let four = addresses(4);
        let table = maglev(&four, 65_537);
        let mut share = [0usize; 4];
        for e in &table {
            share[*e as usize] += 1;
        }
        assert!(
            share.iter().all(|s| s.abs_diff(65_537 / 4) <= 1),
            "{share:?}"
        );
        let b = Balancer::new(policy, &four);
        let keys: Vec<u64> = (0..2000)
            .map(|k| hash(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<Option<usize>> = keys.iter().map(|h| b.pick(policy, 4, Some(*h))).collect();
        // Maglev's promise: few keys of the endpoints that stay move when one goes.
        let three = Balancer::new(policy, &four[..3]);
        let moved = keys
            .iter()
            .zip(&before)
            .filter(|(h, e)| **e != Some(3) && three.pick(policy, 3, Some(**h)) != **e)
            .count();
        assert!(moved < 2000 / 10, "{moved} of 2000 keys moved");
    }

    fn outlier(consecutive_5xx: u32, max_ejection_percent: u32) -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent,
            panic_threshold_percent: 0,
        }
    }

    #[test]
    fn an_endpoint_failing_in_a_row_is_ejected_and_skipped() {
        let b = Balancer::with_outlier_detection(
            LbPolicy::RoundRobin,
            &addresses(3),
            Some(outlier(3, 100)),
        );
        // Two 503s, then a 200: the count starts over.
        assert!(!b.observe(1, Outcome::Status(503)));
        assert!(!b.observe(1, Outcome::Status(503)));
        assert!(!b.observe(1, Outcome::Status(200)));
        assert!(!b.observe(1, Outcome::Status(500)));
        assert!(!b.observe(1, Outcome::NoResponse));
        assert!(b.observe(1, Outcome::Status(500)), "three in a row eject");
        assert!(b.ejected(1));
        for _ in 0..30 {
            assert_ne!(b.pick(LbPolicy::RoundRobin, 3, None), Some(1));
        }
        // 4xx are the caller's: they never count.
        for _ in 0..10 {
            assert!(!b.observe(0, Outcome::Status(404)));
        }
        assert!(!b.ejected(0));
    }

    #[test]
    fn ejections_stop_at_the_allowed_share_and_all_out_means_all_in() {
        // 10% of 3 endpoints: only the first ejection (at least one always may).
        let b = Balancer::with_outlier_detection(
            LbPolicy::RoundRobin,
            &addresses(3),
            Some(outlier(1, 10)),
        );
        assert!(b.observe(0, Outcome::Status(503)));
        assert!(
            !b.observe(1, Outcome::Status(503)),
            "a second would exceed 10%"
        );
        // All of them allowed out: with none in, picks ignore the ejections (panic).
        let b = Balancer::with_outlier_detection(
            LbPolicy::RoundRobin,
            &addresses(2),
            Some(outlier(1, 100)),
        );
        assert!(b.observe(0, Outcome::NoResponse));
        assert!(b.observe(1, Outcome::NoResponse));
        let picks: Vec<usize> = (0..4)
            .filter_map(|_| b.pick(LbPolicy::RoundRobin, 2, None))
            .collect();
        assert_eq!(picks, [0, 1, 0, 1]);
    }

    #[test]
    fn a_hashing_policy_without_a_hash_still_picks() {
        let policy = LbPolicy::RingHash {
            minimum_ring_size: 16,
        };
        let b = Balancer::new(policy, &addresses(2));
        assert!(b.pick(policy, 2, None).is_some_and(|i| i < 2));
    }
}
