//! One static, self-contained HTML page with the conformance matrix of one
//! or more results files: rows are scenarios (`<area>/<scenario>`), columns
//! are the (kernel, option set, implementation) combinations present, each
//! cell is one trial coloured by its status. Clicking a cell shows the
//! trial's reason (the differing observation, the skip reason, ...) in a
//! details panel.
//!
//! No external resources: inline CSS and a small inline script. The output
//! is deterministic (sorted, no timestamps or durations in the layout), so it
//! can be committed or diffed. Opening the page with `?selftest` clicks the
//! first trial cell on load and copies the panel into `document.title`,
//! which `ci/check-html-report` reads back from a headless browser.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use crate::report::{Results, Status, TrialResult};

/// HTML-escapes text for element content and double- or single-quoted
/// attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON for a `<script type="application/json">` block: `<`, `>` and `&`
/// as `\u` escapes, so no `</script>` or `<!--` can appear in it.
fn script_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v)
        .expect("strings always serialize")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// Natural order: digit runs compare as numbers, so kernel 6.1 < 6.12 < 6.18.
fn natural(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    if a.is_empty() || b.is_empty() {
        return a.cmp(b);
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let o = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    ca.len().cmp(&cb.len()).then_with(|| a.cmp(b))
}

/// Natural order with one name first (`default` set, `kernel` implementation).
fn first_then_natural(first: &'static str) -> impl Fn(&str, &str) -> Ordering {
    move |a, b| (a != first).cmp(&(b != first)).then_with(|| natural(a, b))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Column {
    kernel: String,
    set: String,
    implementation: String,
}

fn column_order(a: &Column, b: &Column) -> Ordering {
    natural(&a.kernel, &b.kernel)
        .then_with(|| first_then_natural("default")(&a.set, &b.set))
        .then_with(|| first_then_natural("kernel")(&a.implementation, &b.implementation))
}

fn status_name(s: &Status) -> &'static str {
    match s {
        Status::Pass => "pass",
        Status::Fail => "fail",
        Status::Skip => "skip",
        Status::Deviates => "deviates",
    }
}

fn status_label(t: &TrialResult) -> &'static str {
    match t.status {
        Status::Pass if t.reason.is_empty() => "ok",
        Status::Pass => "ok*",
        Status::Fail => "FAIL",
        Status::Skip => "skip",
        Status::Deviates => "dev",
    }
}

/// Renders the matrix page. When the same trial name appears in more than
/// one `Results`, the earliest in `results` wins. Trials whose names are not
/// `<impl>/<kernel>/<set>/<area>/<scenario>` (such as `parse/<area>/<file>`
/// load failures) are listed below the matrix.
pub fn render(results: &[Results]) -> String {
    // Split names; first occurrence of a name wins.
    let mut seen: HashSet<&str> = HashSet::new();
    let mut cells: Vec<(Column, (String, String), &TrialResult)> = Vec::new();
    let mut others: Vec<&TrialResult> = Vec::new();
    for r in results {
        for t in &r.trials {
            if !seen.insert(t.name.as_str()) {
                continue;
            }
            let parts: Vec<&str> = t.name.splitn(5, '/').collect();
            if parts.len() == 5 && parts.iter().all(|p| !p.is_empty()) && parts[0] != "parse" {
                cells.push((
                    Column {
                        implementation: parts[0].into(),
                        kernel: parts[1].into(),
                        set: parts[2].into(),
                    },
                    (parts[3].into(), parts[4].into()),
                    t,
                ));
            } else {
                others.push(t);
            }
        }
    }
    others.sort_by(|a, b| natural(&a.name, &b.name));

    let mut columns: Vec<Column> = cells
        .iter()
        .map(|(c, _, _)| c.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut rows: Vec<(String, String)> = cells
        .iter()
        .map(|(_, r, _)| r.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    columns.sort_by(column_order);
    rows.sort_by(|a, b| natural(&a.0, &b.0).then_with(|| natural(&a.1, &b.1)));
    let col_index: HashMap<&Column, usize> =
        columns.iter().enumerate().map(|(i, c)| (c, i)).collect();
    let row_index: HashMap<&(String, String), usize> =
        rows.iter().enumerate().map(|(i, r)| (r, i)).collect();
    let mut grid: BTreeMap<(usize, usize), &TrialResult> = BTreeMap::new();
    for (c, r, t) in &cells {
        grid.insert((row_index[r], col_index[c]), t);
    }

    // Reasons are stored once each, in order of first appearance.
    let mut reasons: Vec<&str> = vec![""];
    let mut reason_index: HashMap<&str, usize> = HashMap::from([("", 0)]);
    for t in grid.values() {
        reason_index.entry(t.reason.as_str()).or_insert_with(|| {
            reasons.push(t.reason.as_str());
            reasons.len() - 1
        });
    }

    // Totals.
    let mut totals: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut col_totals: Vec<BTreeMap<&'static str, usize>> = vec![BTreeMap::new(); columns.len()];
    for ((_, c), t) in &grid {
        *totals.entry(status_name(&t.status)).or_default() += 1;
        *col_totals[*c].entry(status_name(&t.status)).or_default() += 1;
    }
    for t in &others {
        *totals.entry(status_name(&t.status)).or_default() += 1;
    }
    let count = |m: &BTreeMap<&'static str, usize>, k: &str| m.get(k).copied().unwrap_or(0);

    let mut kernels: Vec<(String, String)> = results
        .iter()
        .map(|r| (r.kernel.clone(), r.kernel_release.clone()))
        .collect();
    kernels.sort_by(|a, b| natural(&a.0, &b.0).then_with(|| a.1.cmp(&b.1)));
    kernels.dedup();

    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>ovlconf conformance matrix</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
    );
    let _ = writeln!(h, "<header>\n<h1>ovlconf conformance matrix</h1>");
    let _ = write!(h, "<p class=\"meta\">");
    if kernels.is_empty() {
        let _ = write!(h, "No results.");
    } else {
        let list: Vec<String> = kernels
            .iter()
            .map(|(k, r)| format!("<b>{}</b> ({})", escape(k), escape(r)))
            .collect();
        let _ = write!(h, "Kernels: {}. ", list.join(", "));
    }
    let _ = writeln!(
        h,
        "{} scenarios × {} combinations; {} trials: \
         <span class=\"pass\">{} passed</span>, <span class=\"fail\">{} failed</span>, \
         <span class=\"deviates\">{} deviating</span>, <span class=\"skip\">{} skipped</span>.</p>",
        rows.len(),
        columns.len(),
        grid.len() + others.len(),
        count(&totals, "pass"),
        count(&totals, "fail"),
        count(&totals, "deviates"),
        count(&totals, "skip"),
    );
    let _ = writeln!(
        h,
        "<p class=\"legend\"><span class=\"cell pass\">ok</span> pass \
         <span class=\"cell pass\">ok*</span> pass with a note (e.g. new snapshot) \
         <span class=\"cell fail\">FAIL</span> fail \
         <span class=\"cell deviates\">dev</span> deviates as declared \
         <span class=\"cell skip\">skip</span> skipped \
         <span class=\"cell none\"></span> not run \
         <label><input type=\"checkbox\" id=\"onlybad\"> only rows with failures or deviations</label></p>\n\
         </header>"
    );

    // The matrix: three header rows (kernel, option set, implementation).
    let _ = writeln!(h, "<main>\n<table id=\"matrix\">\n<thead>");
    let spans = |key: &dyn Fn(&Column) -> (String, String)| -> Vec<(String, usize)> {
        let mut out: Vec<(String, String, usize)> = Vec::new();
        for c in &columns {
            let (k, label) = key(c);
            match out.last_mut() {
                Some((last, _, n)) if *last == k => *n += 1,
                _ => out.push((k, label, 1)),
            }
        }
        out.into_iter().map(|(_, l, n)| (l, n)).collect()
    };
    let kernel_spans = spans(&|c| (c.kernel.clone(), c.kernel.clone()));
    let set_spans = spans(&|c| (format!("{}\u{0}{}", c.kernel, c.set), c.set.clone()));
    let _ = write!(h, "<tr><th class=\"corner\" rowspan=\"3\">scenario \\ kernel, option set, implementation</th>");
    for (label, n) in &kernel_spans {
        let _ = write!(
            h,
            "<th class=\"kernel\" colspan=\"{n}\">kernel {}</th>",
            escape(label)
        );
    }
    let _ = write!(h, "</tr>\n<tr>");
    for (label, n) in &set_spans {
        let _ = write!(
            h,
            "<th class=\"set\" colspan=\"{n}\" title=\"{0}\">{0}</th>",
            escape(label)
        );
    }
    let _ = write!(h, "</tr>\n<tr>");
    for (i, c) in columns.iter().enumerate() {
        let t = &col_totals[i];
        let _ = write!(
            h,
            "<th class=\"impl\" title=\"{} / {} / {}: {} passed, {} failed, {} deviating, {} skipped\"><span>{}</span></th>",
            escape(&c.implementation),
            escape(&c.kernel),
            escape(&c.set),
            count(t, "pass"),
            count(t, "fail"),
            count(t, "deviates"),
            count(t, "skip"),
            escape(&c.implementation),
        );
    }
    let _ = writeln!(h, "</tr>\n</thead>\n<tbody>");
    let mut last_area: Option<&str> = None;
    for (ri, (area, scenario)) in rows.iter().enumerate() {
        if last_area != Some(area.as_str()) {
            let _ = writeln!(
                h,
                "<tr class=\"area\"><th colspan=\"{}\">{}</th></tr>",
                columns.len() + 1,
                escape(area)
            );
            last_area = Some(area);
        }
        let bad = (0..columns.len()).any(|ci| {
            grid.get(&(ri, ci))
                .is_some_and(|t| matches!(t.status, Status::Fail | Status::Deviates))
        });
        let _ = write!(
            h,
            "<tr{}><th class=\"row\" title=\"{1}/{2}\"><span>{1}/</span><b>{2}</b></th>",
            if bad { " class=\"bad\"" } else { "" },
            escape(area),
            escape(scenario)
        );
        for ci in 0..columns.len() {
            match grid.get(&(ri, ci)) {
                None => {
                    let _ = write!(h, "<td class=\"cell none\"></td>");
                }
                Some(t) => {
                    let _ = write!(
                        h,
                        "<td class=\"cell {}\" tabindex=\"0\" data-r=\"{}\" data-c=\"{}\" data-ms=\"{}\" title=\"{}\">{}</td>",
                        status_name(&t.status),
                        reason_index[t.reason.as_str()],
                        escape(&t.covers.join(" ")),
                        t.duration_ms,
                        escape(&t.name),
                        status_label(t),
                    );
                }
            }
        }
        let _ = writeln!(h, "</tr>");
    }
    let _ = writeln!(h, "</tbody>\n</table>");
    if rows.is_empty() {
        let _ = writeln!(h, "<p>No scenario trials in the results.</p>");
    }

    if !others.is_empty() {
        let _ = writeln!(h, "<section id=\"others\">\n<h2>Other trials</h2>\n<ul>");
        for t in &others {
            let _ = writeln!(
                h,
                "<li><span class=\"cell {}\">{}</span> <code>{}</code>{}</li>",
                status_name(&t.status),
                status_label(t),
                escape(&t.name),
                if t.reason.is_empty() {
                    String::new()
                } else {
                    format!("<pre>{}</pre>", escape(&t.reason))
                }
            );
        }
        let _ = writeln!(h, "</ul>\n</section>");
    }
    let _ = writeln!(h, "</main>");

    let _ = writeln!(
        h,
        "<aside id=\"details\" hidden>\n<button id=\"close\" type=\"button\" aria-label=\"close\">×</button>\n\
         <h2 id=\"d-name\"></h2>\n<p id=\"d-meta\"></p>\n<pre id=\"d-reason\"></pre>\n</aside>"
    );
    let _ = writeln!(
        h,
        "<script type=\"application/json\" id=\"reasons\">{}</script>",
        script_json(&reasons)
    );
    let _ = writeln!(h, "<script>{JS}</script>\n</body>\n</html>");
    h
}

const CSS: &str = r#"
:root { --pass:#c8e6c9; --pass-fg:#1b5e20; --fail:#ef9a9a; --fail-fg:#7f0000;
  --dev:#ffe082; --dev-fg:#6d4c00; --skip:#e0e0e0; --skip-fg:#555; --none:#fafafa; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; background: #fff; }
header { padding: 10px 14px 4px; }
h1 { font-size: 18px; margin: 0 0 4px; }
.meta, .legend { margin: 4px 0; }
.meta .pass { color: var(--pass-fg); } .meta .fail { color: var(--fail-fg); }
.meta .deviates { color: var(--dev-fg); } .meta .skip { color: var(--skip-fg); }
.legend .cell { display: inline-block; min-width: 34px; text-align: center; padding: 1px 3px; border: 1px solid #ccc; }
.legend label { margin-left: 12px; }
main { padding: 0 14px 40vh; }
table { border-collapse: separate; border-spacing: 0; }
thead { position: sticky; top: 0; z-index: 2; }
thead th { background: #f3f4f6; border-right: 1px solid #d0d4da; border-bottom: 1px solid #d0d4da; font-weight: 600; padding: 2px 3px; }
th.kernel { background: #e3e8f0; text-align: left; }
th.set { font-weight: 500; font-size: 11px; max-width: 1px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
th.impl { height: 96px; vertical-align: bottom; font-weight: 400; font-size: 11px; }
th.impl span { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; }
th.corner { text-align: left; vertical-align: bottom; font-weight: 400; color: #666; position: sticky; left: 0; z-index: 3; }
tbody th.row { position: sticky; left: 0; z-index: 1; background: #fff; text-align: left; font-weight: 400;
  white-space: nowrap; padding: 1px 8px 1px 2px; border-right: 1px solid #d0d4da; }
tbody th.row b { font-weight: 600; } tbody th.row span { color: #777; }
tr.area th { text-align: left; background: #eef1f5; padding: 5px 4px 2px; font-size: 12px; position: sticky; left: 0; }
td.cell { min-width: 34px; height: 20px; text-align: center; font-size: 11px; padding: 0 2px;
  border-right: 1px solid #fff; border-bottom: 1px solid #fff; cursor: pointer; }
.cell.pass { background: var(--pass); color: var(--pass-fg); }
.cell.fail { background: var(--fail); color: var(--fail-fg); font-weight: 700; }
.cell.deviates { background: var(--dev); color: var(--dev-fg); }
.cell.skip { background: var(--skip); color: var(--skip-fg); }
.cell.none { background: var(--none); cursor: default; }
td.cell:hover, td.cell:focus { outline: 2px solid #1e40af; outline-offset: -2px; }
td.cell.selected { outline: 3px solid #111; outline-offset: -3px; }
table.onlybad tbody tr:not(.bad):not(.area) { display: none; }
#others ul { list-style: none; padding: 0; }
#others li { margin: 4px 0; } #others .cell { display: inline-block; min-width: 34px; text-align: center; }
#others pre { margin: 2px 0 0 40px; white-space: pre-wrap; }
#details { position: fixed; left: 0; right: 0; bottom: 0; max-height: 38vh; overflow: auto; background: #fff;
  border-top: 3px solid #1e40af; box-shadow: 0 -2px 10px rgba(0,0,0,.15); padding: 8px 14px; z-index: 5; }
#details h2 { font-size: 14px; margin: 0 30px 2px 0; font-family: ui-monospace, monospace; word-break: break-all; }
#details p { margin: 0 0 4px; color: #444; }
#details pre { margin: 0; white-space: pre-wrap; word-break: break-word; font: 12px/1.4 ui-monospace, monospace;
  background: #f6f8fa; padding: 6px 8px; border-radius: 4px; }
#close { position: absolute; right: 10px; top: 6px; border: 0; background: none; font-size: 20px; cursor: pointer; }
"#;

const JS: &str = r#"
(function () {
  "use strict";
  var reasons = JSON.parse(document.getElementById("reasons").textContent);
  var table = document.getElementById("matrix");
  var panel = document.getElementById("details");
  var selected = null;
  var words = { pass: "passed", fail: "failed", skip: "skipped", deviates: "deviates (declared)" };
  function statusOf(td) {
    var s = ["pass", "fail", "skip", "deviates"];
    for (var i = 0; i < s.length; i++) if (td.classList.contains(s[i])) return s[i];
    return "";
  }
  function show(td) {
    if (selected) selected.classList.remove("selected");
    selected = td;
    td.classList.add("selected");
    var st = statusOf(td);
    var reason = reasons[Number(td.getAttribute("data-r"))] || "";
    document.getElementById("d-name").textContent = td.title;
    var meta = words[st] || st;
    var covers = td.getAttribute("data-c");
    if (covers) meta += " · covers " + covers;
    meta += " · " + td.getAttribute("data-ms") + " ms";
    document.getElementById("d-meta").textContent = meta;
    document.getElementById("d-reason").textContent =
      reason || (st === "pass" ? "(passed, nothing to report)" : "(no reason recorded)");
    panel.hidden = false;
  }
  table.addEventListener("click", function (e) {
    var td = e.target.closest("td.cell[data-r]");
    if (td) show(td);
  });
  table.addEventListener("keydown", function (e) {
    var td = e.target.closest("td.cell[data-r]");
    if (td && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); show(td); }
  });
  document.getElementById("close").addEventListener("click", function () {
    panel.hidden = true;
    if (selected) selected.classList.remove("selected");
    selected = null;
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape") document.getElementById("close").click();
  });
  document.getElementById("onlybad").addEventListener("change", function (e) {
    table.classList.toggle("onlybad", e.target.checked);
  });
  if (/[?&]selftest\b/.test(location.search)) {
    var first = table.querySelector("td.cell[data-r]");
    if (first) {
      first.click();
      document.title = "selftest ok | " + document.getElementById("d-name").textContent +
        " | " + document.getElementById("d-meta").textContent +
        " | " + document.getElementById("d-reason").textContent;
    } else {
      document.title = "selftest: no cells";
    }
  }
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["6.18", "6.1", "6.12", "5.15"];
        v.sort_by(|a, b| natural(a, b));
        assert_eq!(v, ["5.15", "6.1", "6.12", "6.18"]);
        let mut s = vec!["xino", "default", "index"];
        s.sort_by(|a, b| first_then_natural("default")(a, b));
        assert_eq!(s, ["default", "index", "xino"]);
    }

    #[test]
    fn escapes() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(
            script_json(&["</script><!--&"]),
            r#"["\u003c/script\u003e\u003c!--\u0026"]"#
        );
    }
}
