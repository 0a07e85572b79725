//! Durations as Istio's and Gateway API's resources write them: a sequence of numbers with
//! units (`7s`, `0.5s`, `100ms`, `1m30s`, `1h`), as Go's `time.ParseDuration` reads them
//! (Istio's validation uses it); `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`.

use std::time::Duration;

/// Reads a duration; the error says what is wrong in words.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("is empty".to_string());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?} has a number without a unit (ns, us, ms, s, m, h)"))?;
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration (like 7s, 0.5s, 100ms, 1m30s)"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "{text:?} has unit {unit:?}: use ns, us, ms, s, m or h"
                ));
            }
        };
        total += value * seconds;
        rest = next;
    }
    if !total.is_finite() || total > 10.0 * 365.0 * 86400.0 {
        return Err(format!("{text:?} is too long"));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_istio_and_gateway_api_write() {
        assert_eq!(parse("7s"), Ok(Duration::from_secs(7)));
        assert_eq!(parse("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert!(parse("7").is_err());
        assert!(parse("7 seconds").is_err());
        assert!(parse("").is_err());
        assert!(parse("-1s").is_err());
    }
}
