//! Great-circle distance and the shipment cost and transit formulas of API.md.

/// Mean Earth radius (IUGG), in km.
const EARTH_RADIUS_KM: f64 = 6_371.008_8;

/// Haversine distance between two points in decimal degrees, in km.
pub fn distance_km(lat_a: f64, lon_a: f64, lat_b: f64, lon_b: f64) -> f64 {
    let (phi_a, phi_b) = (lat_a.to_radians(), lat_b.to_radians());
    let delta_phi = (lat_b - lat_a).to_radians();
    let delta_lambda = (lon_b - lon_a).to_radians();
    let h = (delta_phi / 2.0).sin().powi(2) + phi_a.cos() * phi_b.cos() * (delta_lambda / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// `base_cost + cost_per_km × distance_km`, rounded to the cent (the per-unit part is added
/// by the planner). Saturates instead of overflowing.
pub fn fixed_cost(base_cost: i64, cost_per_km: i64, distance_km: f64) -> i64 {
    let distance_cost = (cost_per_km as f64 * distance_km).round();
    let distance_cost = if distance_cost >= i64::MAX as f64 { i64::MAX } else { distance_cost as i64 };
    base_cost.saturating_add(distance_cost)
}

/// `processing_days + ceil(distance_km / km_per_day)`.
pub fn estimated_days(processing_days: i64, distance_km: f64, km_per_day: f64) -> i64 {
    let transit = (distance_km / km_per_day).ceil();
    processing_days.saturating_add(if transit >= i64::MAX as f64 { i64::MAX } else { transit as i64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_distances() {
        // Goal: the haversine formula matches published great-circle distances. Method:
        // New York–London (≈5,570 km) and a zero distance.
        let new_york_london = distance_km(40.7128, -74.0060, 51.5074, -0.1278);
        assert!((new_york_london - 5_570.2).abs() < 5.0, "{new_york_london}");
        assert_eq!(distance_km(10.0, 20.0, 10.0, 20.0), 0.0);
        let quarter = distance_km(0.0, 0.0, 0.0, 90.0);
        assert!((quarter - EARTH_RADIUS_KM * std::f64::consts::FRAC_PI_2).abs() < 1e-6);
    }

    #[test]
    fn cost_and_days() {
        // Goal: the formulas of API.md. Method: hand-computed values.
        assert_eq!(fixed_cost(500, 2, 100.4), 701);
        assert_eq!(estimated_days(1, 801.0, 800.0), 3);
        assert_eq!(estimated_days(2, 0.0, 800.0), 2);
        assert_eq!(fixed_cost(i64::MAX, 1, 10.0), i64::MAX);
    }
}
