//! Errno names, both ways. Scenarios speak of errors by name (`EXDEV`).

use std::collections::HashMap;
use std::sync::OnceLock;

use nix::errno::Errno;

fn table() -> &'static HashMap<String, i32> {
    static TABLE: OnceLock<HashMap<String, i32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (1..200)
            .map(Errno::from_raw)
            .filter(|e| *e != Errno::UnknownErrno)
            .map(|e| (format!("{e:?}"), e as i32))
            .collect()
    })
}

/// The number for a name like `EXDEV`.
pub fn from_name(name: &str) -> Option<i32> {
    table().get(name).copied()
}

/// The name for a number, e.g. `EXDEV`.
pub fn name(raw: i32) -> String {
    let e = Errno::from_raw(raw);
    if e == Errno::UnknownErrno {
        format!("errno {raw}")
    } else {
        format!("{e:?}")
    }
}

/// The name of an io::Error's errno, or its text when it has none.
pub fn of_io(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(raw) => name(raw),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        assert_eq!(from_name("EXDEV"), Some(libc_exdev()));
        assert_eq!(name(libc_exdev()), "EXDEV");
        assert_eq!(from_name("EWHATEVER"), None);
    }

    fn libc_exdev() -> i32 {
        Errno::EXDEV as i32
    }
}
