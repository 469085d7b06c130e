//! The coordinator's modules form no circle: a module that another one
//! reaches through a chain of `use`s (and paths in code) never reaches
//! back. A circle makes a change in one file ripple through all of them,
//! as the old `context` did with every controller.
//!
//! Written here rather than with a tool (`cargo-modules` draws the graph
//! but is a binary, not a library a test can run): `syn` parses each file,
//! and the rules of Rust paths are few enough to follow by hand.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// A module by its path from the crate root (`workloads::follow`); the
/// root is the empty path.
type Module = Vec<String>;

fn sources() -> BTreeMap<Module, syn::File> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &mut files);
    files
        .into_iter()
        .filter(|path| path.file_name().is_some_and(|n| n != "main.rs"))
        .map(|path| {
            let relative = path.strip_prefix(&root).expect("under src").with_extension("");
            let mut module: Module = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if module.last().is_some_and(|m| m == "mod" || m == "lib") {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).expect("readable source");
            let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (module, file)
        })
        .collect()
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Every path a file names, as written, outside its tests.
#[derive(Default)]
struct Paths(Vec<Vec<String>>);

impl Paths {
    fn use_tree(&mut self, prefix: &[String], tree: &syn::UseTree) {
        let with = |name: &syn::Ident| [prefix, &[name.to_string()]].concat();
        match tree {
            syn::UseTree::Path(p) => self.use_tree(&with(&p.ident), &p.tree),
            syn::UseTree::Name(n) => self.0.push(with(&n.ident)),
            syn::UseTree::Rename(r) => self.0.push(with(&r.ident)),
            syn::UseTree::Glob(_) => self.0.push(prefix.to_vec()),
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(prefix, t)),
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        let test_only = item
            .attrs
            .iter()
            .any(|a| a.path().is_ident("cfg") && a.parse_args::<syn::Ident>().is_ok_and(|arg| arg == "test"));
        if !test_only {
            syn::visit::visit_item_mod(self, item);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&[], &item.tree);
    }

    // `pub(super)` names who may see an item, not what it uses.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_path(&mut self, path: &'ast syn::Path) {
        self.0.push(path.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, path);
    }
}

/// The module `path`, named in `from`, lands in: the longest known module
/// it starts with, once `crate`, `self`, `super` and child modules are
/// resolved. `None` for anything outside the crate.
fn resolve(path: &[String], from: &Module, modules: &BTreeSet<Module>) -> Option<Module> {
    let (mut base, rest) = match path.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &path[1..]),
        Some("self") => (from.clone(), &path[1..]),
        Some("super") => {
            let mut base = from.clone();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            (base, rest)
        }
        Some(first) if modules.contains(&[from.as_slice(), &[first.to_string()]].concat()) => (from.clone(), path),
        _ => return None,
    };
    let mut found = base.clone();
    for segment in rest {
        base.push(segment.clone());
        if modules.contains(&base) {
            found = base.clone();
        } else {
            break;
        }
    }
    Some(found)
}

/// Each module and the modules it uses, the root left out: it only
/// declares the others.
fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let files = sources();
    let modules: BTreeSet<Module> = files.keys().cloned().collect();
    files
        .iter()
        .filter(|(module, _)| !module.is_empty())
        .map(|(module, file)| {
            let mut paths = Paths::default();
            paths.visit_file(file);
            let uses = paths
                .0
                .iter()
                .filter_map(|p| resolve(p, module, &modules))
                .filter(|used| used != module && !used.is_empty())
                // A module's own children are its parts (a `mod.rs` that
                // re-exports them is their facade), not modules it uses.
                .filter(|used| !used.starts_with(module))
                .collect();
            (module.clone(), uses)
        })
        .collect()
}

/// A circle in `graph`, if it has one.
fn circle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn walk(
        at: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        trail: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match marks.get(at) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = trail.iter().position(|m| m == at).unwrap_or(0);
                return Some([&trail[start..], std::slice::from_ref(at)].concat());
            }
            None => {}
        }
        marks.insert(at.clone(), Mark::Open);
        trail.push(at.clone());
        for next in graph.get(at).into_iter().flatten() {
            if let Some(found) = walk(next, graph, marks, trail) {
                return Some(found);
            }
        }
        trail.pop();
        marks.insert(at.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph.keys().find_map(|start| walk(start, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn the_coordinators_modules_form_no_circle() {
    let graph = graph();
    if std::env::var_os("MODULE_GRAPH").is_some() {
        for (module, uses) in &graph {
            let uses: Vec<String> = uses.iter().map(|m| m.join("::")).collect();
            eprintln!("{} -> {}", module.join("::"), uses.join(", "));
        }
    }
    assert!(graph.len() > 20, "the sources were read: {:?}", graph.keys().collect::<Vec<_>>());
    if let Some(circle) = circle(&graph) {
        let names: Vec<String> = circle.iter().map(|m| m.join("::")).collect();
        panic!("modules in a circle: {}", names.join(" -> "));
    }
}

#[test]
fn a_circle_is_found() {
    let module = |name: &str| vec![name.to_string()];
    let graph: BTreeMap<Module, BTreeSet<Module>> = [
        (module("a"), [module("b")].into()),
        (module("b"), [module("c")].into()),
        (module("c"), [module("a")].into()),
        (module("d"), [module("a")].into()),
    ]
    .into();
    let found = circle(&graph).expect("a circle");
    assert_eq!(found, [module("a"), module("b"), module("c"), module("a")]);
    let no_circle: BTreeMap<Module, BTreeSet<Module>> =
        [(module("a"), [module("b")].into()), (module("b"), BTreeSet::new())].into();
    assert_eq!(circle(&no_circle), None);
}

#[test]
fn paths_resolve_as_rust_resolves_them() {
    let modules: BTreeSet<Module> =
        [vec![], vec!["w".into()], vec!["w".into(), "x".into()], vec!["w".into(), "y".into()], vec!["c".into()]].into();
    let path = |p: &str| p.split("::").map(String::from).collect::<Vec<_>>();
    let from: Module = vec!["w".into(), "x".into()];
    assert_eq!(resolve(&path("crate::c::Thing"), &from, &modules), Some(vec!["c".into()]));
    assert_eq!(resolve(&path("super::y::f"), &from, &modules), Some(vec!["w".into(), "y".into()]));
    assert_eq!(resolve(&path("super::Wakers"), &from, &modules), Some(vec!["w".into()]));
    assert_eq!(resolve(&path("y::f"), &vec!["w".into()], &modules), Some(vec!["w".into(), "y".into()]));
    assert_eq!(resolve(&path("kube::Api"), &from, &modules), None);
}
