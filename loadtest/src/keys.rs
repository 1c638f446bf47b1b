//! Which SKU a request touches: uniform, Zipf-skewed, or a hot set taking a fixed share of the
//! picks. Pure functions of the RNG passed in, so a seeded RNG gives the same SKUs on every
//! run. Must not import the gRPC or scenario code.

use std::sync::Arc;

use rand::Rng;
use rand::rngs::StdRng;

/// How SKU indexes `0..skus` are drawn.
#[derive(Debug, Clone)]
pub enum SkuPicker {
    Uniform {
        skus: usize,
    },
    /// P(SKU k) proportional to 1 / (k + 1)^s. `cumulative[k]` is the sum of the weights of
    /// SKUs 0..=k: an exact inverse-CDF draw by binary search, shared by every caller.
    Zipf {
        cumulative: Arc<[f64]>,
    },
    /// `hot_fraction` of the picks go uniformly to SKUs `0..hot_skus`, the others uniformly to
    /// `hot_skus..skus` (all to the hot set when it is every SKU).
    Hot {
        skus: usize,
        hot_skus: usize,
        hot_fraction: f64,
    },
}

/// Draws for the distinct SKUs of one order before falling back to a linear fill; bounds the
/// loop when the distribution leaves few distinct SKUs likely (a tiny hot set, a steep skew).
const DISTINCT_ATTEMPTS_PER_LINE: usize = 64;

impl SkuPicker {
    pub fn uniform(skus: usize) -> Self {
        assert!(skus > 0);
        SkuPicker::Uniform { skus }
    }

    pub fn zipf(skus: usize, exponent: f64) -> Self {
        assert!(skus > 0 && exponent.is_finite() && exponent > 0.0);
        let mut total = 0.0;
        let cumulative: Vec<f64> = (0..skus)
            .map(|index| {
                total += ((index + 1) as f64).powf(-exponent);
                total
            })
            .collect();
        SkuPicker::Zipf { cumulative: cumulative.into() }
    }

    pub fn hot(skus: usize, hot_skus: usize, hot_fraction: f64) -> Self {
        assert!(hot_skus > 0 && hot_skus <= skus);
        assert!((0.0..=1.0).contains(&hot_fraction));
        SkuPicker::Hot { skus, hot_skus, hot_fraction }
    }

    pub fn skus(&self) -> usize {
        match self {
            SkuPicker::Uniform { skus } | SkuPicker::Hot { skus, .. } => *skus,
            SkuPicker::Zipf { cumulative } => cumulative.len(),
        }
    }

    /// One SKU index in `0..skus()`.
    pub fn pick(&self, rng: &mut StdRng) -> usize {
        match self {
            SkuPicker::Uniform { skus } => rng.random_range(0..*skus),
            SkuPicker::Zipf { cumulative } => {
                let total = cumulative[cumulative.len() - 1];
                let target = rng.random::<f64>() * total;
                // The first SKU whose cumulative weight exceeds the target; `min` guards the
                // rounding of the last sums.
                cumulative.partition_point(|&sum| sum <= target).min(cumulative.len() - 1)
            }
            SkuPicker::Hot { skus, hot_skus, hot_fraction } => {
                if *hot_skus == *skus || rng.random::<f64>() < *hot_fraction {
                    rng.random_range(0..*hot_skus)
                } else {
                    rng.random_range(*hot_skus..*skus)
                }
            }
        }
    }

    /// `count` distinct SKU indexes (at most `skus()`), drawn from the distribution as long
    /// as that finds new ones quickly, then filled with the next unused indexes.
    pub fn distinct(&self, rng: &mut StdRng, count: usize) -> Vec<usize> {
        let count = count.min(self.skus());
        let mut picked = Vec::with_capacity(count);
        let mut attempts = 0;
        while picked.len() < count && attempts < count * DISTINCT_ATTEMPTS_PER_LINE {
            attempts += 1;
            let sku = self.pick(rng);
            if !picked.contains(&sku) {
                picked.push(sku);
            }
        }
        let mut next = 0;
        while picked.len() < count {
            if !picked.contains(&next) {
                picked.push(next);
            }
            next += 1;
        }
        picked
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    const SEED: u64 = 7;

    fn counts(picker: &SkuPicker, draws: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(SEED);
        let mut counts = vec![0; picker.skus()];
        for _ in 0..draws {
            counts[picker.pick(&mut rng)] += 1;
        }
        counts
    }

    #[test]
    fn the_same_seed_picks_the_same_skus() {
        // Goal: a run is reproducible from --seed. Method: two RNGs with one seed draw 1,000
        // SKUs from each distribution; a different seed draws a different sequence.
        println!("seed {SEED}");
        for picker in
            [SkuPicker::uniform(1_000), SkuPicker::zipf(1_000, 0.99), SkuPicker::hot(1_000, 10, 0.9)]
        {
            let draw = |seed| {
                let mut rng = StdRng::seed_from_u64(seed);
                (0..1_000).map(|_| picker.pick(&mut rng)).collect::<Vec<_>>()
            };
            assert_eq!(draw(SEED), draw(SEED), "{picker:?}");
            assert_ne!(draw(SEED), draw(SEED + 1), "{picker:?}");
        }
    }

    #[test]
    fn zipf_follows_its_exponent() {
        // Goal: the Zipf picker's frequencies are those of the law. Method: 200,000 draws with
        // s = 1 over 1,000 SKUs; SKU 0 gets 1/H(1000) ~ 13.4 %, SKU 1 half of that, SKU 9 a
        // tenth, within 10 % of the expectation; every pick is in range.
        println!("seed {SEED}");
        let draws = 200_000;
        let counts = counts(&SkuPicker::zipf(1_000, 1.0), draws);
        let harmonic: f64 = (1..=1_000).map(|k| 1.0 / k as f64).sum();
        for rank in [1usize, 2, 10] {
            let expected = draws as f64 / (rank as f64 * harmonic);
            let seen = counts[rank - 1] as f64;
            assert!((seen - expected).abs() < 0.1 * expected, "rank {rank}: {seen} vs {expected}");
        }
        assert_eq!(counts.iter().sum::<usize>(), draws);
        // A steeper exponent concentrates more on the head.
        let steep = super::tests::counts(&SkuPicker::zipf(1_000, 1.5), draws);
        assert!(steep[0] > counts[0]);
    }

    #[test]
    fn hot_skus_take_their_fraction() {
        // Goal: --hot-fraction of the picks go to the hot set, the rest spread over the others.
        // Method: 100,000 draws with 10 hot SKUs of 1,000 and fraction 0.9; the hot share is
        // within 1 point of 90 %, and the cold picks reach most cold SKUs.
        println!("seed {SEED}");
        let draws = 100_000;
        let counts = counts(&SkuPicker::hot(1_000, 10, 0.9), draws);
        let hot: usize = counts[..10].iter().sum();
        let share = hot as f64 / draws as f64;
        assert!((share - 0.9).abs() < 0.01, "hot share {share}");
        assert!(counts[10..].iter().filter(|&&count| count > 0).count() > 900);
        // The whole set hot: every pick is in it, whatever the fraction.
        let all_hot = super::tests::counts(&SkuPicker::hot(5, 5, 0.0), 1_000);
        assert_eq!(all_hot.iter().sum::<usize>(), 1_000);
    }

    #[test]
    fn uniform_spreads_evenly() {
        // Goal: the default picker favours no SKU. Method: 100,000 draws over 10 SKUs; each
        // gets 10 % within 1 point.
        println!("seed {SEED}");
        for count in counts(&SkuPicker::uniform(10), 100_000) {
            assert!((count as f64 / 100_000.0 - 0.1).abs() < 0.01, "{count}");
        }
    }

    #[test]
    fn distinct_skus_end_even_when_the_distribution_repeats_itself() {
        // Goal: an order's lines are distinct SKUs and the draw always ends. Method: one hot
        // SKU taking every pick, 3 lines wanted: the fallback fills the other two; asking for
        // more lines than SKUs gives every SKU once.
        println!("seed {SEED}");
        let mut rng = StdRng::seed_from_u64(SEED);
        let picked = SkuPicker::hot(100, 1, 1.0).distinct(&mut rng, 3);
        assert_eq!(picked.len(), 3);
        assert_eq!(picked[0], 0);
        let mut all = SkuPicker::zipf(4, 2.0).distinct(&mut rng, 10);
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }
}
