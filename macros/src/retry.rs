//! Compile-time checks of a `retry = …` expression: duration literals given
//! to `Retry::exponential` / `Retry::fixed`, and `.attempts(0)`. Anything
//! not a literal is left to the runtime's validation at start-up.

use syn::visit::Visit;
use syn::{Expr, ExprCall, ExprLit, ExprMethodCall, Lit};

use crate::errors::Errors;

pub fn check(expr: &Expr, errors: &mut Errors) {
    RetryVisitor { errors }.visit_expr(expr);
}

struct RetryVisitor<'a> {
    errors: &'a mut Errors,
}

impl<'ast> Visit<'ast> for RetryVisitor<'_> {
    fn visit_expr_call(&mut self, call: &'ast ExprCall) {
        let constructor = match &*call.func {
            Expr::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
            _ => None,
        };
        if matches!(constructor.as_deref(), Some("exponential" | "fixed")) {
            for arg in &call.args {
                if let Expr::Lit(ExprLit {
                    lit: Lit::Str(text),
                    ..
                }) = arg
                    && let Err(invalid) = idem_grammar::duration::parse(&text.value())
                {
                    self.errors.push(text.span(), invalid.to_string());
                }
            }
        }
        syn::visit::visit_expr_call(self, call);
    }

    fn visit_expr_method_call(&mut self, call: &'ast ExprMethodCall) {
        if call.method == "attempts"
            && let Some(Expr::Lit(ExprLit {
                lit: Lit::Int(n), ..
            })) = call.args.first()
            && n.base10_parse::<u64>().is_ok_and(|n| n == 0)
        {
            self.errors.push(
                n.span(),
                "a retry policy needs at least 1 attempt (the first delivery); `attempts(1)` means no retries",
            );
        }
        syn::visit::visit_expr_method_call(self, call);
    }
}
