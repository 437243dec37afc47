//! The criteria front end: durations, the parser, validation, bucket files and rendered
//! diagnostics (snapshots of every file in `tests/malformed/`).

use std::fs;
use std::path::{Path, PathBuf};

use membrane_criteria::ast::{
    CmpOp, EventLeaf, EventTest, Expr, Leaf, Literal, PropLeaf, PropTest,
};
use membrane_criteria::bucket::{
    load_bucket, load_dir, parse_bucket, resolve_plugin_path, BucketBody, BucketDef, DwellMark,
    EntryLimit, OnChange, ReconcileJoins,
};
use membrane_criteria::diag::{Diagnostic, Diagnostics};
use membrane_criteria::duration::{parse_duration, DurationError};
use membrane_criteria::parser::parse_criteria;
use membrane_criteria::validate::validate;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn parse(src: &str) -> Expr {
    parse_criteria(src).unwrap_or_else(|diags| panic!("{src:?} should parse: {diags:#?}"))
}

fn parse_errors(src: &str) -> Vec<Diagnostic> {
    match parse_criteria(src) {
        Ok(expr) => panic!("{src:?} should not parse, got {expr:?}"),
        Err(diags) => diags,
    }
}

fn messages(diags: &[Diagnostic]) -> Vec<&str> {
    diags.iter().map(|d| d.message.as_str()).collect()
}

fn leaf(expr: &Expr) -> &Leaf {
    match expr {
        Expr::Leaf(leaf) => leaf,
        other => panic!("expected a leaf, got {other:?}"),
    }
}

fn event(expr: &Expr) -> &EventLeaf {
    match leaf(expr) {
        Leaf::Event(event) => event,
        other => panic!("expected an event leaf, got {other:?}"),
    }
}

fn prop(expr: &Expr) -> &PropLeaf {
    match leaf(expr) {
        Leaf::Prop(prop) => prop,
        other => panic!("expected a prop leaf, got {other:?}"),
    }
}

fn bucket(text: &str) -> BucketDef {
    parse_bucket(Path::new("buckets/test-bucket.toml"), text)
        .unwrap_or_else(|diags| panic!("should load:\n{diags}"))
}

fn bucket_errors(text: &str) -> Diagnostics {
    match parse_bucket(Path::new("buckets/test-bucket.toml"), text) {
        Ok(def) => panic!("should not load: {def:?}"),
        Err(diags) => diags,
    }
}

const VALID: &str = "criteria = '''event(\"session_start\").exists()'''\n";

// ---------------------------------------------------------------- durations

#[test]
fn durations_in_every_unit() {
    assert_eq!(parse_duration("90s"), Ok(90));
    assert_eq!(parse_duration("15m"), Ok(900));
    assert_eq!(parse_duration("12h"), Ok(43_200));
    assert_eq!(parse_duration("14d"), Ok(1_209_600));
    assert_eq!(parse_duration("2w"), Ok(1_209_600));
}

#[test]
fn malformed_durations_say_what_would_be_right() {
    for text in ["", "d", "14", "14 d", "1.5h", "14days", "-1d", "P14D"] {
        let err = parse_duration(text).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected an integer followed by one of s, m, h, d, w, e.g. `14d`"),
            "{text:?}: {err}"
        );
    }
    assert_eq!(
        parse_duration("14x"),
        Err(DurationError::UnknownUnit {
            text: "14x".into(),
            unit: "x".into()
        })
    );
}

#[test]
fn zero_and_huge_durations_are_rejected() {
    let zero = parse_duration("0d").unwrap_err();
    assert_eq!(zero, DurationError::Zero("0d".into()));
    assert!(zero.to_string().contains("zero"));
    assert!(matches!(
        parse_duration("99999999999999999999w"),
        Err(DurationError::TooLong(_))
    ));
    assert!(matches!(
        parse_duration("36501d"),
        Err(DurationError::TooLong(_))
    ));
    assert_eq!(parse_duration("36500d"), Ok(36_500 * 86_400));
}

// ---------------------------------------------------------------- parser

#[test]
fn event_leaves() {
    let src = r#"event("session_start").within(14d).not_exists()"#;
    let expr = parse(src);
    let leaf = event(&expr);
    assert_eq!(leaf.name, "session_start");
    assert_eq!(&src[leaf.name_span.clone()], "\"session_start\"");
    assert_eq!(leaf.within_secs, Some(14 * 86_400));
    assert_eq!(leaf.test, EventTest::NotExists);
    assert_eq!(leaf.span, 0..src.len());

    assert_eq!(
        event(&parse(r#"event("a").exists()"#)).test,
        EventTest::Exists
    );
    assert_eq!(event(&parse(r#"event("a").exists()"#)).within_secs, None);
    let counted = parse(r#"event("a") . within( 7d ) . count ( ) >= 5"#);
    assert_eq!(event(&counted).test, EventTest::Count(CmpOp::Ge, 5));
    assert_eq!(event(&counted).within_secs, Some(7 * 86_400));
}

#[test]
fn prop_leaves_with_every_literal_and_operator() {
    let cases = [
        (
            r#"prop("plan") == "trial""#,
            CmpOp::Eq,
            Literal::Str("trial".into()),
        ),
        (r#"prop("n") != 3"#, CmpOp::Ne, Literal::Num(3.0)),
        (r#"prop("n") < -2.5"#, CmpOp::Lt, Literal::Num(-2.5)),
        (r#"prop("n") <= 0.25"#, CmpOp::Le, Literal::Num(0.25)),
        (r#"prop("n") > 10"#, CmpOp::Gt, Literal::Num(10.0)),
        (r#"prop("n") >= 500"#, CmpOp::Ge, Literal::Num(500.0)),
        (r#"prop("b") == true"#, CmpOp::Eq, Literal::Bool(true)),
        (r#"prop("b") != false"#, CmpOp::Ne, Literal::Bool(false)),
        (r#"prop("b") == null"#, CmpOp::Eq, Literal::Null),
    ];
    for (src, op, literal) in cases {
        let expr = parse(src);
        let leaf = prop(&expr);
        assert_eq!(leaf.test, PropTest::Cmp(op, literal), "{src}");
        assert_eq!(leaf.span, 0..src.len(), "{src}");
    }
}

#[test]
fn string_escapes() {
    let expr = parse(r#"prop("k") == "a\"b\\c\nd\te\u{e9}\u{1F600}""#);
    assert_eq!(
        prop(&expr).test,
        PropTest::Cmp(
            CmpOp::Eq,
            Literal::Str("a\"b\\c\nd\te\u{e9}\u{1F600}".into())
        )
    );
    let diags = parse_errors(r#"prop("k") == "a\qb""#);
    assert_eq!(messages(&diags), ["unknown escape `\\q`"]);
    let diags = parse_errors(r#"prop("k") == "\u{110000}""#);
    assert!(diags[0].message.contains("not a Unicode character"));
}

#[test]
fn and_binds_tighter_than_or_and_chains_are_flattened() {
    let expr = parse(
        r#"event("a").exists() or event("b").exists() and event("c").exists() and event("d").exists() or event("e").exists()"#,
    );
    let Expr::Or(items, _) = &expr else {
        panic!("{expr:?}")
    };
    assert_eq!(items.len(), 3);
    let Expr::And(conjuncts, _) = &items[1] else {
        panic!("{:?}", items[1])
    };
    assert_eq!(conjuncts.len(), 3);
    assert_eq!(event(&conjuncts[2]).name, "d");
}

#[test]
fn not_and_parentheses() {
    let src = r#"not (event("a").exists() or event("b").exists()) and not not prop("x") == 1"#;
    let expr = parse(src);
    let Expr::And(items, span) = &expr else {
        panic!("{expr:?}")
    };
    assert_eq!(span, &(0..src.len()));
    let Expr::Not(group, not_span) = &items[0] else {
        panic!("{:?}", items[0])
    };
    assert_eq!(
        &src[not_span.clone()],
        r#"not (event("a").exists() or event("b").exists()"#
    );
    assert!(matches!(**group, Expr::Or(ref inner, _) if inner.len() == 2));
    let Expr::Not(inner, _) = &items[1] else {
        panic!("{:?}", items[1])
    };
    assert!(matches!(**inner, Expr::Not(..)));
}

#[test]
fn whitespace_and_newlines_are_insignificant() {
    let tight = parse(r#"event("a").exists() and prop("p")=="x""#);
    let loose = parse("\n  event ( \"a\" )\n   .exists( )\n and\n\tprop(\"p\")  ==  \"x\"\n");
    let strip = |expr: &Expr| format!("{expr:?}").replace(|c: char| c.is_ascii_digit(), "");
    assert_eq!(strip(&tight), strip(&loose));
}

#[test]
fn missing_test_after_event_says_what_is_expected() {
    let diags = parse_errors(r#"event("x")"#);
    assert_eq!(
        messages(&diags),
        ["expected `.exists()`, `.not_exists()` or `.count()` after `event(\"x\")`, found the end of the criteria"]
    );
    assert_eq!(diags[0].span, 10..10);
    let diags = parse_errors(r#"event("x").within(7d) and prop("a") == 1"#);
    assert!(diags[0].message.starts_with(
        "expected `.exists()`, `.not_exists()` or `.count()` after `event(\"x\").within(7d)`"
    ));
}

#[test]
fn misspellings_get_suggestions() {
    let diags = parse_errors(r#"evnt("x").exists()"#);
    assert_eq!(
        messages(&diags),
        ["unknown function `evnt`, did you mean `event`?"]
    );
    assert_eq!(diags[0].span, 0..4);
    let diags = parse_errors(r#"event("x").exsts()"#);
    assert_eq!(
        messages(&diags),
        ["unknown method `.exsts()`, did you mean `.exists()`?"]
    );
    let diags = parse_errors(r#"props("x") == 1"#);
    assert_eq!(
        messages(&diags),
        ["unknown function `props`, did you mean `prop`?"]
    );
}

#[test]
fn lexical_errors() {
    let diags = parse_errors(r#"event("x).exists()"#);
    assert_eq!(messages(&diags)[0], "unterminated string");
    assert_eq!(diags[0].span.start, 6);
    let diags = parse_errors(r#"prop("plan") = "pro""#);
    assert_eq!(messages(&diags), ["`=` is not a comparison"]);
    let diags = parse_errors(r#"event("a").exists() && event("b").exists()"#);
    assert_eq!(messages(&diags), ["unexpected `&&`"]);
    assert_eq!(diags[0].label, "write `and`");
    let diags = parse_errors(r#"event('a').exists()"#);
    assert_eq!(messages(&diags), ["strings use double quotes"]);
    let diags = parse_errors(r#"event("a").exists() @"#);
    assert_eq!(messages(&diags), ["unexpected character `@`"]);
}

#[test]
fn trailing_input_and_unbalanced_parentheses() {
    let diags = parse_errors(r#"event("a").exists() event("b").exists()"#);
    assert_eq!(
        messages(&diags),
        ["expected `and`, `or` or the end of the criteria, found `event`"]
    );
    let diags = parse_errors(r#"event("a").exists() AND event("b").exists()"#);
    assert_eq!(
        diags[0].help.as_deref(),
        Some("keywords are lowercase: `and`")
    );
    let diags = parse_errors(r#"event("a").exists())"#);
    assert_eq!(messages(&diags), ["unmatched `)`"]);
    let diags = parse_errors(r#"(event("a").exists()"#);
    assert_eq!(
        messages(&diags),
        ["expected `)`, found the end of the criteria"]
    );
}

#[test]
fn empty_and_malformed_values() {
    assert_eq!(messages(&parse_errors("  \n ")), ["the criteria are empty"]);
    assert_eq!(
        messages(&parse_errors(r#"event("").exists()"#)),
        ["the event name must not be empty"]
    );
    assert_eq!(
        messages(&parse_errors(r#"event("a").count() >= 2.5"#)),
        ["`2.5` is not a whole number"]
    );
    assert_eq!(
        messages(&parse_errors(r#"prop("a") == 14d"#)),
        ["`14d` is not a number"]
    );
    assert_eq!(
        messages(&parse_errors(r#"event("a").within("14d").exists()"#)),
        ["durations are written without quotes"]
    );
    assert_eq!(
        messages(&parse_errors(
            r#"event("a").within(7d).within(7d).exists()"#
        )),
        ["`.within(...)` is given twice"]
    );
    let diags = parse_errors(r#"prop("a") == pro"#);
    assert_eq!(
        diags[0].help.as_deref(),
        Some("to compare with the text pro, quote it: `\"pro\"`")
    );
}

#[test]
fn several_errors_are_reported_in_one_run() {
    let diags = parse_errors(
        r#"evnt("a").exists() and event("b").within(0d).exists() or (prop("c") == and event("d"))"#,
    );
    assert_eq!(diags.len(), 4, "{diags:#?}");
    assert!(diags
        .windows(2)
        .all(|pair| pair[0].span.start <= pair[1].span.start));
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let deep = format!(
        "{}event(\"a\").exists(){}",
        "(".repeat(5000),
        ")".repeat(5000)
    );
    assert!(parse_errors(&deep)[0].message.contains("nested too deeply"));
    let nots = format!("{}event(\"a\").exists()", "not ".repeat(5000));
    assert!(parse_errors(&nots)[0].message.contains("nested too deeply"));
    let fine = format!("{}event(\"a\").exists(){}", "(".repeat(60), ")".repeat(60));
    parse(&fine);
}

// ---------------------------------------------------------------- validation

fn validation_messages(src: &str) -> Vec<String> {
    validate(&parse(src))
        .into_iter()
        .map(|d| d.message)
        .collect()
}

#[test]
fn valid_criteria_have_no_problems() {
    for src in [
        r#"event("session_start").exists() and event("session_start").within(14d).not_exists()"#,
        r#"event("session_start").within(7d).count() >= 5"#,
        r#"prop("plan") == "trial" and prop("trial_days_left") <= 3"#,
        r#"prop("verified") == true or prop("deleted_at") == null"#,
        r#"not event("a").exists() and prop("plan") == "pro""#,
    ] {
        assert_eq!(validation_messages(src), Vec::<String>::new(), "{src}");
    }
}

#[test]
fn reserved_event_names() {
    let src = r#"event("bucket:power-users").exists()"#;
    let diags = validate(&parse(src));
    assert_eq!(diags.len(), 1);
    assert!(diags[0].message.contains("reserved"));
    assert_eq!(&src[diags[0].span.clone()], "\"bucket:power-users\"");
}

#[test]
fn ordering_comparisons_with_booleans_and_null() {
    for src in [
        r#"prop("a") < true"#,
        r#"prop("a") >= false"#,
        r#"prop("a") > null"#,
        r#"prop("a") <= null"#,
    ] {
        let found = validation_messages(src);
        assert!(
            found[0].contains("only == and != apply to booleans and null"),
            "{src}: {found:?}"
        );
    }
}

#[test]
fn negative_counts() {
    let found = validation_messages(r#"event("a").count() > -1 and prop("p") == 1"#);
    assert_eq!(found.len(), 1);
    assert!(found[0].contains("never negative"), "{found:?}");
}

#[test]
fn blank_user_rule() {
    for src in [
        r#"event("x").within(7d).not_exists()"#,
        r#"not event("x").exists()"#,
        r#"prop("plan") != "pro""#,
        r#"event("x").count() >= 0"#,
        r#"event("x").exists() or event("y").not_exists()"#,
    ] {
        let diags = validate(&parse(src));
        assert_eq!(diags.len(), 1, "{src}");
        assert!(diags[0].message.contains("everyone who never did anything"));
        assert_eq!(diags[0].span, 0..src.len());
        assert!(diags[0]
            .help
            .as_deref()
            .unwrap()
            .contains("`event(\"x\").exists() and event(\"x\").within(7d).not_exists()` is fine"));
    }
}

// ---------------------------------------------------------------- bucket files

#[test]
fn minimal_bucket_gets_the_defaults() {
    let def = bucket(VALID);
    assert_eq!(def.id, "test-bucket");
    assert_eq!(def.description, "");
    assert!(def.enabled);
    assert_eq!(def.entry_limit, EntryLimit::Unlimited);
    assert_eq!(def.min_dwell_secs, None);
    assert_eq!(def.max_dwell_secs, None);
    assert!(def.dwell.is_empty());
    assert_eq!(def.dwell_every_secs, None);
    assert_eq!(def.reconcile_joins, ReconcileJoins::Auto);
    assert_eq!(def.on_change, OnChange::Silent);
    assert!(!def.time_based());
    let BucketBody::Criteria { text, plan, .. } = &def.body else {
        panic!("{:?}", def.body)
    };
    assert_eq!(text, "event(\"session_start\").exists()");
    assert_eq!(plan.facts.len(), 1);
}

#[test]
fn every_option() {
    let def = bucket(
        r#"
id = "went-dormant"
description = "Was active, no session for 14 days"
criteria = '''
  event("session_start").exists()
  and event("session_start").within(14d).not_exists()
'''
enabled = false
entry_limit = "once_per_period"
entry_period = "30d"
min_dwell = "1h"
max_dwell = "30d"
dwell = ["7d", "1d"]
dwell_every = "7d"
reconcile_joins = false
on_change = "emit"
"#,
    );
    assert_eq!(def.id, "went-dormant");
    assert_eq!(def.description, "Was active, no session for 14 days");
    assert!(!def.enabled);
    assert_eq!(
        def.entry_limit,
        EntryLimit::OncePerPeriod {
            period_secs: 30 * 86_400
        }
    );
    assert_eq!(def.min_dwell_secs, Some(3_600));
    assert_eq!(def.max_dwell_secs, Some(30 * 86_400));
    assert_eq!(
        def.dwell,
        [
            DwellMark {
                label: "1d".into(),
                secs: 86_400
            },
            DwellMark {
                label: "7d".into(),
                secs: 7 * 86_400
            }
        ]
    );
    assert_eq!(def.dwell_every_secs, Some(7 * 86_400));
    assert_eq!(def.reconcile_joins, ReconcileJoins::Never);
    assert_eq!(def.on_change, OnChange::Emit);
    assert!(def.time_based());

    assert_eq!(
        bucket(&format!(
            "{VALID}entry_limit = \"once\"\nreconcile_joins = true\n"
        ))
        .entry_limit,
        EntryLimit::Once
    );
    assert_eq!(
        bucket(&format!("{VALID}reconcile_joins = true\n")).reconcile_joins,
        ReconcileJoins::Always
    );
}

#[test]
fn option_errors() {
    let cases = [
        ("id = \"Bad Id\"\n", "`Bad Id` is not a valid bucket id"),
        ("id = \"-leading-dash\"\n", "not a valid bucket id"),
        ("id = 7\n", "`id` must be a string, found integer"),
        (
            "enabled = \"yes\"\n",
            "`enabled` must be `true` or `false`, found string",
        ),
        ("entry_limit = \"twice\"\n", "`entry_limit` must be one of"),
        (
            "entry_limit = \"once_per_period\"\n",
            "needs `entry_period`",
        ),
        (
            "entry_period = \"30d\"\n",
            "`entry_period` applies only with",
        ),
        (
            "min_dwell = \"2d\"\nmax_dwell = \"1d\"\n",
            "`max_dwell` is shorter than `min_dwell`",
        ),
        (
            "min_dwell = \"soon\"\n",
            "`soon` does not start with a whole number",
        ),
        ("dwell = \"7d\"\n", "`dwell` must be an array"),
        (
            "dwell = [\"1d\", \"24h\"]\n",
            "`24h` is listed twice in `dwell`",
        ),
        ("dwell_every = \"0s\"\n", "a duration of zero"),
        (
            "reconcile_joins = \"sometimes\"\n",
            "`reconcile_joins` must be `\"auto\"`, `true` or `false`",
        ),
        ("on_change = \"loud\"\n", "`on_change` must be one of"),
        (
            "plugin = \"plugins/x.wasm\"\n",
            "either `criteria` or `plugin`, not both",
        ),
        (
            "[config]\nx = 1\n",
            "`config` applies only to plugin buckets",
        ),
        ("entry_limt = \"once\"\n", "unknown key `entry_limt`"),
    ];
    for (extra, expected) in cases {
        let diags = bucket_errors(&format!("{VALID}{extra}"));
        assert_eq!(diags.items.len(), 1, "{extra}: {diags}");
        assert!(
            diags.items[0].message.contains(expected),
            "{extra}: expected {expected:?} in {:?}",
            diags.items[0].message
        );
    }
}

#[test]
fn unknown_keys_point_at_the_key_and_suggest() {
    let text = format!("{VALID}descripton = \"x\"\n");
    let diags = bucket_errors(&text);
    let item = &diags.items[0];
    assert_eq!(&text[item.span.clone()], "descripton");
    assert_eq!(item.help.as_deref(), Some("did you mean `description`?"));
    let text = format!("{VALID}zzz = 1\n");
    assert!(bucket_errors(&text).items[0]
        .help
        .as_deref()
        .unwrap()
        .starts_with("known keys are id, description, criteria"));
}

#[test]
fn wrong_types_point_at_the_value() {
    let text = format!("{VALID}max_dwell = 30\n");
    let diags = bucket_errors(&text);
    assert_eq!(&text[diags.items[0].span.clone()], "30");
}

#[test]
fn criteria_errors_point_into_the_file() {
    // Literal multi-line string: the newline after `'''` is dropped by TOML.
    let text = "criteria = '''\n  evnt(\"a\").exists()\n'''\n";
    let diags = bucket_errors(text);
    assert_eq!(&text[diags.items[0].span.clone()], "evnt");
    // One-line literal string.
    let text = "criteria = 'event(\"bucket:x\").exists()'\n";
    let diags = bucket_errors(text);
    assert_eq!(&text[diags.items[0].span.clone()], "\"bucket:x\"");
    // Basic string with escapes before the error.
    let text =
        "criteria = \"prop(\\\"k\\\") == \\\"\\u00e9\\t\\\" and evnt(\\\"a\\\").exists()\"\n";
    let diags = bucket_errors(text);
    assert_eq!(&text[diags.items[0].span.clone()], "evnt");
    // Multi-line basic string with a line-ending backslash.
    let text =
        "criteria = \"\"\"\nevent(\\\"a\\\").exists() \\\n    and evnt(\\\"b\\\").exists()\"\"\"\n";
    let diags = bucket_errors(text);
    assert_eq!(&text[diags.items[0].span.clone()], "evnt");
}

#[test]
fn plugin_buckets() {
    let def = parse_bucket(
        Path::new("project/buckets/churn.toml"),
        "plugin = \"plugins/churn-risk.wasm\"\n[config]\nthreshold = 0.8\nname = \"x\"\ntags = [1, 2]\nsince = 2024-01-02\n",
    )
    .unwrap();
    let BucketBody::Plugin { path, config } = &def.body else {
        panic!("{:?}", def.body)
    };
    assert_eq!(path, Path::new("project/plugins/churn-risk.wasm"));
    assert_eq!(
        config,
        &serde_json::json!({"threshold": 0.8, "name": "x", "tags": [1, 2], "since": "2024-01-02"})
    );
    assert!(def.time_based());

    let bare = parse_bucket(Path::new("b/churn.toml"), "plugin = \"plugins/c.wasm\"\n").unwrap();
    assert!(
        matches!(&bare.body, BucketBody::Plugin { config, .. } if config == &serde_json::json!({}))
    );
    let diags = bucket_errors("plugin = \"plugins/c.wasm\"\nconfig = 3\n");
    assert!(diags.items[0].message.contains("`config` must be a table"));
}

#[test]
fn plugin_path_rule() {
    let bucket_file = Path::new("/srv/app/buckets/x.toml");
    assert_eq!(
        resolve_plugin_path(bucket_file, "plugins/a.wasm"),
        Path::new("/srv/app/plugins/a.wasm")
    );
    assert_eq!(
        resolve_plugin_path(bucket_file, "local/a.wasm"),
        Path::new("/srv/app/buckets/local/a.wasm")
    );
    assert_eq!(
        resolve_plugin_path(bucket_file, "/opt/a.wasm"),
        Path::new("/opt/a.wasm")
    );
    assert_eq!(
        resolve_plugin_path(Path::new("buckets/x.toml"), "plugins/a.wasm"),
        Path::new("plugins/a.wasm")
    );
}

#[test]
fn criteria_hash_ignores_layout_but_not_meaning() {
    let hash = |criteria: &str| bucket(&format!("criteria = '''{criteria}'''\n")).criteria_hash();
    let base = hash(r#"event("a").exists() and prop("p") == "x y""#);
    assert_eq!(base.len(), 64);
    assert_eq!(
        base,
        hash("\n  event(\"a\")\n    .exists()\n  and prop(\"p\")   ==  \"x y\"\n")
    );
    assert_ne!(base, hash(r#"event("a").exists() and prop("p") == "x  y""#));
    assert_ne!(base, hash(r#"event("b").exists() and prop("p") == "x y""#));

    let plugin = |config: &str| {
        parse_bucket(
            Path::new("buckets/p.toml"),
            &format!("plugin = \"plugins/p.wasm\"\n[config]\n{config}"),
        )
        .unwrap()
        .criteria_hash()
    };
    assert_eq!(plugin("a = 1\nb = 2\n"), plugin("b = 2\na = 1\n"));
    assert_ne!(plugin("a = 1\n"), plugin("a = 2\n"));
    assert_ne!(plugin("a = 1\n"), base);
}

#[test]
fn the_example_buckets_all_load() {
    let report = load_dir(&repo_root().join("buckets"));
    let rendered: Vec<String> = report.errors.iter().map(Diagnostics::render).collect();
    assert!(report.errors.is_empty(), "{}", rendered.join("\n"));
    let ids: Vec<&str> = report.buckets.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "cart-abandoners",
            "high-value",
            "power-users",
            "trial-ending-soon",
            "went-dormant"
        ]
    );
    assert!(report.buckets.iter().all(|b| !b.description.is_empty()));
}

#[test]
fn load_dir_reports_duplicate_ids_at_the_second_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.toml"), format!("id = \"same\"\n{VALID}")).unwrap();
    fs::write(dir.path().join("b.toml"), format!("{VALID}id = \"same\"\n")).unwrap();
    fs::write(dir.path().join("c.toml"), "criteria = 1\n").unwrap();
    fs::write(dir.path().join("notes.txt"), "not a bucket").unwrap();
    let report = load_dir(dir.path());
    assert_eq!(report.buckets.len(), 1);
    assert!(report.buckets[0].path.ends_with("a.toml"));
    assert_eq!(report.errors.len(), 2);
    let duplicate = &report.errors[0];
    assert!(duplicate.path.ends_with("b.toml"));
    assert!(duplicate.items[0]
        .message
        .starts_with("bucket id `same` is already used by"));
    assert_eq!(
        &duplicate.source[duplicate.items[0].span.clone()],
        "\"same\""
    );
    assert!(report.errors[1].path.ends_with("c.toml"));
}

#[test]
fn unreadable_files_and_directories_become_diagnostics() {
    let missing = repo_root().join("buckets/does-not-exist.toml");
    let diags = load_bucket(&missing).unwrap_err();
    assert!(diags.items[0]
        .message
        .starts_with("cannot read bucket file"));
    assert!(diags.render().contains("does-not-exist.toml"));
    let report = load_dir(&repo_root().join("no-such-dir"));
    assert!(report.buckets.is_empty());
    assert!(report.errors[0].items[0]
        .message
        .starts_with("cannot read bucket directory"));
}

// ---------------------------------------------------------------- rendering

#[test]
fn json_positions_are_one_based_and_count_chars() {
    let text = "description = \"é\" ; oops\n";
    let diags = bucket_errors(text);
    let json = diags.to_json();
    let first = &json[0];
    assert_eq!(first["file"], "buckets/test-bucket.toml");
    assert_eq!(first["line"], 1);
    let column = first["column"].as_u64().unwrap() as usize;
    let byte = diags.items[0].span.start;
    assert_eq!(column, text[..byte].chars().count() + 1);
    assert!(first["message"]
        .as_str()
        .unwrap()
        .starts_with("invalid TOML"));
}

#[test]
fn display_is_render() {
    let diags = bucket_errors("");
    assert_eq!(diags.to_string(), diags.render());
    let error: &dyn std::error::Error = &diags;
    assert!(error
        .to_string()
        .starts_with("error: a bucket needs `criteria` or `plugin`"));
}

fn malformed_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(repo_root().join("tests/malformed"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn malformed_bucket_files_render_precise_errors() {
    let files = malformed_files();
    assert!(files.len() >= 15);
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(&file).unwrap();
        let diags = match parse_bucket(&Path::new("tests/malformed").join(&name), &text) {
            Ok(def) => panic!("{name} should be rejected, loaded {def:?}"),
            Err(diags) => diags,
        };
        insta::assert_snapshot!(name.trim_end_matches(".toml").to_string(), diags.render());
    }
}

#[test]
fn malformed_json_report() {
    let name = "several-errors.toml";
    let text = fs::read_to_string(repo_root().join("tests/malformed").join(name)).unwrap();
    let diags = parse_bucket(&Path::new("tests/malformed").join(name), &text).unwrap_err();
    insta::assert_snapshot!(
        "several-errors.json",
        serde_json::to_string_pretty(&diags.to_json()).unwrap()
    );
}

// ---------------------------------------------------------------- robustness

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    /// Fragments of the language, so that random input gets past the lexer often.
    fn criteria_soup() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("event"),
            Just("prop"),
            Just("(\"a\")"),
            Just("\"bucket:x\""),
            Just("."),
            Just("within(7d)"),
            Just("within(0d)"),
            Just("exists()"),
            Just("not_exists()"),
            Just("count()"),
            Just(" and "),
            Just(" or "),
            Just("not "),
            Just("("),
            Just(")"),
            Just("=="),
            Just("<"),
            Just(">="),
            Just("-1"),
            Just("2.5"),
            Just("null"),
            Just("\"é\\u{e9}\""),
            Just("\\"),
            Just("\n"),
            Just("'"),
        ];
        prop::collection::vec(piece, 0..30).prop_map(|pieces| pieces.concat())
    }

    fn check_criteria(src: &str) {
        if let Ok(expr) = parse_criteria(src) {
            let span = expr.span();
            assert!(span.end <= src.len());
            validate(&expr);
        }
    }

    fn check_bucket(text: &str) {
        if let Err(diags) = parse_bucket(Path::new("buckets/fuzz.toml"), text) {
            diags.render();
            diags.to_json();
            for item in &diags.items {
                assert!(item.span.start <= item.span.end && item.span.end <= text.len());
            }
        }
    }

    proptest! {
        #[test]
        fn parse_criteria_on_any_string(src in any::<String>()) {
            check_criteria(&src);
        }

        #[test]
        fn parse_criteria_on_language_fragments(src in criteria_soup()) {
            check_criteria(&src);
        }

        #[test]
        fn parse_bucket_on_any_string(text in any::<String>()) {
            check_bucket(&text);
        }

        #[test]
        fn parse_bucket_with_fuzzed_criteria(src in criteria_soup(), basic in any::<bool>()) {
            let text = if basic {
                format!("criteria = \"{}\"\n", src.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
            } else {
                format!("criteria = '''\n{src}'''\n")
            };
            check_bucket(&text);
        }
    }
}
