use proptest::prelude::*;

use super::*;

fn parse(yaml: &str) -> Result<Template, TemplateError> {
    Template::from_yaml(yaml, &Limits::default())
}

const DIAMOND: &str = r#"
namespace: shapes
name: diamond
version: 1.0.0
defaults: { max_attempts: 2, timeout: 5s }
steps:
  - { name: merge, handler: noop, depends_on: [c1, c2] }
  - { name: start, handler: noop }
  - { name: b1, handler: noop, depends_on: [start] }
  - { name: b2, handler: noop, depends_on: [start], max_attempts: 4, retryable: false }
  - { name: c1, handler: noop, depends_on: [b1] }
  - { name: c2, handler: noop, depends_on: [b2], timeout: 250ms, config: { ms: 5 } }
  - { name: end, handler: noop, depends_on: [merge] }
"#;

#[test]
fn diamond_is_ordered_and_levelled() {
    let t = parse(DIAMOND).unwrap();
    let names: Vec<_> = t.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["start", "b1", "b2", "c1", "c2", "merge", "end"]);
    let level = |n| t.step(n).unwrap().dependency_level;
    assert_eq!((level("start"), level("b2"), level("c1"), level("merge"), level("end")), (0, 1, 2, 3, 4));
    let b2 = t.step("b2").unwrap();
    assert_eq!((b2.max_attempts, b2.retryable, b2.timeout_ms), (4, false, 5_000));
    let c2 = t.step("c2").unwrap();
    assert_eq!((c2.max_attempts, c2.timeout_ms), (2, 250));
    assert_eq!(c2.config, serde_json::json!({ "ms": 5 }));
    assert_eq!(t.version, semver::Version::new(1, 0, 0));
}

/// Aliases that would expand to billions of nodes (the "billion laughs") are refused
/// while parsing, not expanded: a 1 KB template cannot cost the API its memory.
#[test]
fn alias_bombs_are_refused_not_expanded() {
    let mut yaml = String::from(
        "namespace: p\nname: q\nversion: 1.0.0\nsteps:\n  - name: a\n    handler: noop\n    config:\n      x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for i in 1..10 {
        let p = i - 1;
        yaml.push_str(&format!(
            "      x{i}: &x{i} [*x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}]\n"
        ));
    }
    assert!(yaml.len() < 1_000, "{}", yaml.len());
    let started = std::time::Instant::now();
    let error = parse(&yaml).unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(error.to_string().contains("repetition limit"), "{error}");
}

#[test]
fn defaults_apply_when_nothing_is_said() {
    let t = parse("namespace: a\nname: b\nversion: 0.1.0\nsteps: [{ name: s, handler: noop }]").unwrap();
    let s = &t.steps[0];
    assert_eq!((s.max_attempts, s.retryable, s.timeout_ms), (3, true, 30_000));
    assert_eq!(s.config, serde_json::json!({}));
}

#[test]
fn cycles_are_refused_with_their_path() {
    let direct = parse("namespace: a\nname: b\nversion: 1.0.0\nsteps: [{ name: s, handler: noop, depends_on: [s] }]");
    assert_eq!(direct.unwrap_err(), TemplateError::Cycle(vec!["s".into(), "s".into()]));
    let indirect = parse(
        "namespace: a\nname: b\nversion: 1.0.0\nsteps:\n - { name: root, handler: noop }\n - { name: x, handler: noop, depends_on: [root, z] }\n - { name: y, handler: noop, depends_on: [x] }\n - { name: z, handler: noop, depends_on: [y] }",
    )
    .unwrap_err();
    let TemplateError::Cycle(path) = &indirect else { panic!("{indirect:?}") };
    assert_eq!(path.first(), path.last());
    assert_eq!(path.len(), 4, "{path:?}");
    assert!(indirect.to_string().contains("dependency cycle"), "{indirect}");
}

#[test]
fn each_problem_is_named() {
    let cases = [
        ("namespace: A-b\nname: b\nversion: 1.0.0\nsteps: [{ name: s, handler: noop }]", "namespace: `A-b`"),
        ("namespace: a\nname: b.c\nversion: 1.0.0\nsteps: [{ name: s, handler: noop }]", "name: `b.c`"),
        ("namespace: a\nname: b\nversion: one\nsteps: [{ name: s, handler: noop }]", "version: `one`"),
        ("namespace: a\nname: b\nversion: 1.0\nsteps: [{ name: s, handler: noop }]", "version: `1.0`"),
        ("namespace: a\nname: b\nversion: 1.0.0\nsteps: []", "at least one step"),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{ name: s, handler: noop }, { name: s, handler: noop }]",
            "duplicate step name `s`",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{ name: s, handler: noop, depends_on: [t] }]",
            "depends on unknown step `t`",
        ),
        ("namespace: a\nname: b\nversion: 1.0.0\nsteps: [{ name: Bad, handler: noop }]", "steps[0].name: `Bad`"),
        ("namespace: a\nname: b\nversion: 1.0.0\nsteps: [{ name: s, handler: noop, max_attempts: 0 }]", "max_attempts"),
        (
            "namespace: a\nname: b\nversion: 1.0.0\ninput_schema: { type: 12 }\nsteps: [{ name: s, handler: noop }]",
            "input_schema",
        ),
        (
            "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{ name: s, handler: noop, colour: red }]",
            "unknown field `colour`",
        ),
        ("namespace: a\nname: b\nversion: 1.0.0\nsteps: [{ name: s, handler: 'no pe' }]", "handler of step `s`"),
    ];
    for (yaml, expected) in cases {
        let err = parse(yaml).expect_err(yaml).to_string();
        assert!(err.contains(expected), "{yaml}\n  gave: {err}\n  want: {expected}");
    }
}

#[test]
fn step_and_size_limits_hold() {
    let limits = Limits { max_steps: 2, max_template_bytes: 200, ..Limits::default() };
    let three = "namespace: a\nname: b\nversion: 1.0.0\nsteps: [{name: s, handler: noop}, {name: t, handler: noop}, {name: u, handler: noop}]";
    assert_eq!(Template::from_yaml(three, &limits).unwrap_err(), TemplateError::TooManySteps { count: 3, max: 2 });
    let big = format!("{three}\ndescription: {}", "x".repeat(300));
    assert!(matches!(Template::from_yaml(&big, &limits), Err(TemplateError::TooLarge { .. })));
}

#[test]
fn content_hash_ignores_formatting_but_not_meaning() {
    let a = parse("namespace: a\nname: b\nversion: 1.0.0\nsteps: [{ name: s, handler: noop, config: {x: 1, y: 2} }]")
        .unwrap();
    let b = parse("namespace: a\nname: b\nversion: 1.0.0\nsteps:\n  - name: s\n    handler: noop\n    config:\n      y: 2\n      x: 1\n").unwrap();
    let c = parse("namespace: a\nname: b\nversion: 1.0.0\nsteps: [{ name: s, handler: sleep }]").unwrap();
    assert_eq!(a.content_hash(), b.content_hash());
    assert_ne!(a.content_hash(), c.content_hash());
}

#[test]
fn context_is_checked_against_the_schema() {
    let t = parse(
        "namespace: a\nname: b\nversion: 1.0.0\ninput_schema: { type: object, required: [payment_id], properties: { amount: { type: number } } }\nsteps: [{ name: s, handler: noop }]",
    )
    .unwrap();
    assert!(t.validate_context(&serde_json::json!({ "payment_id": 1, "amount": 2.5 })).is_ok());
    let missing = t.validate_context(&serde_json::json!({ "amount": 2 })).unwrap_err();
    assert!(missing.to_string().contains("payment_id"), "{missing}");
    let wrong = t.validate_context(&serde_json::json!({ "payment_id": 1, "amount": "x" })).unwrap_err();
    assert_eq!(wrong.path, "/amount");
}

proptest! {
    /// Any DAG (edges only from earlier to later declarations, shuffled) validates, and the
    /// order puts every parent before its children with levels one past the deepest parent.
    #[test]
    fn random_dags_validate(n in 1usize..25, seed_edges in prop::collection::vec((0usize..25, 0usize..25), 0..60), rotate in 0usize..25) {
        let mut steps: Vec<(String, Vec<String>)> = (0..n).map(|i| (format!("s{i}"), Vec::new())).collect();
        for (a, b) in seed_edges {
            let (a, b) = (a % n, b % n);
            if a < b { steps[b].1.push(format!("s{a}")); }
        }
        steps.rotate_left(rotate % n);
        let yaml = format!(
            "namespace: p\nname: q\nversion: 1.0.0\nsteps:\n{}",
            steps.iter().map(|(s, d)| format!("  - {{ name: {s}, handler: noop, depends_on: [{}] }}\n", d.join(", "))).collect::<String>()
        );
        let t = parse(&yaml).unwrap();
        prop_assert_eq!(t.steps.len(), n);
        let pos: HashMap<_, _> = t.steps.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        for s in &t.steps {
            let expected = s.depends_on.iter().map(|d| t.step(d).unwrap().dependency_level + 1).max().unwrap_or(0);
            prop_assert_eq!(s.dependency_level, expected);
            for d in &s.depends_on { prop_assert!(pos[d] < pos[&s.name]); }
        }
    }

    /// Adding a back edge to any chain makes a cycle, always reported.
    #[test]
    fn back_edges_are_cycles(n in 2usize..15, from in 0usize..15, to in 0usize..15) {
        let (lo, hi) = { let (a, b) = (from % n, to % n); if a <= b { (a, b) } else { (b, a) } };
        let steps: String = (0..n).map(|i| {
            let mut deps = if i > 0 { vec![format!("s{}", i - 1)] } else { vec![] };
            if i == lo { deps.push(format!("s{hi}")); }
            format!("  - {{ name: s{i}, handler: noop, depends_on: [{}] }}\n", deps.join(", "))
        }).collect();
        let err = parse(&format!("namespace: p\nname: q\nversion: 1.0.0\nsteps:\n{steps}")).unwrap_err();
        prop_assert!(matches!(err, TemplateError::Cycle(_)), "{:?}", err);
    }
}
