//! The behaviour IDs of `cases/BEHAVIOURS.md` (a copy of the project spec).

use std::collections::BTreeMap;
use std::path::Path;

/// ID -> the behaviour's one-line text.
#[derive(Debug, Clone, Default)]
pub struct SpecIds {
    pub ids: BTreeMap<String, String>,
}

impl SpecIds {
    pub fn load(path: &Path) -> std::io::Result<SpecIds> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    /// Lines of the form `- AREA-NN text`.
    pub fn parse(text: &str) -> SpecIds {
        let ids = text
            .lines()
            .filter_map(|l| l.strip_prefix("- "))
            .filter_map(|l| {
                let (id, rest) = l.split_once(' ')?;
                let (area, num) = id.split_once('-')?;
                let ok = !area.is_empty()
                    && area.chars().all(|c| c.is_ascii_uppercase())
                    && !num.is_empty()
                    && num.chars().all(|c| c.is_ascii_digit());
                ok.then(|| (id.to_string(), rest.trim().to_string()))
            })
            .collect();
        SpecIds { ids }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids() {
        let s = SpecIds::parse("# x\n- LAY-01 A name.\n- not an id\n- WH-09 B.\n");
        assert!(s.contains("LAY-01"));
        assert!(s.contains("WH-09"));
        assert_eq!(s.ids.len(), 2);
    }
}
