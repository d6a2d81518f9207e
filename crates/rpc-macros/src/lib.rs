//! The `#[service]` attribute of meshwork-rpc. Use it through
//! `meshwork_rpc::service` (or `meshwork::service`); its documentation is
//! there.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{
    Error, FnArg, GenericArgument, Ident, ItemTrait, LitInt, Pat, PathArguments, ReturnType, Token,
    TraitItem, Type,
};

/// Turns a trait of async methods into a service that can be served on one
/// node and a typed client that calls it from any node.
///
/// ```text
/// #[meshwork_rpc::service(version = 1)]   // version: optional, default 1
/// pub trait Calc {
///     /// Adds.
///     async fn add(&self, a: i64, b: i64) -> i64;
///     /// Divides; the caller receives the `String` error typed.
///     async fn div(&self, a: i64, b: i64) -> Result<i64, String>;
///     /// Safe to run twice: retried on another provider after a timeout.
///     #[idempotent]
///     async fn total(&self) -> u64;
/// }
/// ```
///
/// # What it generates
///
/// - **The trait**, with each `async fn m(&self, ..) -> T` rewritten as
///   `fn m(&self, ..) -> impl Future<Output = T> + Send`, and
///   `Send + Sync + 'static` as supertraits. Implement it with plain
///   `async fn`s (no `async_trait` needed); the futures must be `Send`.
/// - **`CalcServer<T: Calc>`**: wraps an implementation
///   (`CalcServer::new(imp)`) and implements `meshwork_rpc::Service`:
///   it lists the methods, reports the version, decodes each call's
///   arguments (a tuple, in the call's codec), runs the method and encodes
///   its result; an `Err(e)` of a method returning `Result<T, E>` is encoded
///   as the application error. Serve it with `rpc.serve("calc", ..)`. (Its
///   results are encoded straight into the answer the RPC layer sends,
///   behind their header, through the hidden `Service::call_framed`;
///   `Service::call` gives them as any service does.)
/// - **`CalcClient`**: obtained with `rpc.client::<CalcClient>("calc")`; one
///   method per trait method with the same arguments, returning a `Send`
///   future (`impl Future<Output = ..> + Send + '_`, borrowing only the
///   client) of `Result<T, RpcError<E>>` for a method returning
///   `Result<T, E>`, and of `Result<T, RpcError>` (`E = NoError`)
///   otherwise. The arguments are encoded when the method is called; the
///   call goes out when the future is first polled. `with_deadline(d)` sets
///   the deadline of its calls. It implements `meshwork_rpc::ServiceClient`.
/// - **Byte vectors as byte strings**: an argument or (ok) result written
///   `Vec<u8>` (or `std::vec::Vec<u8>`, `alloc::vec::Vec<u8>`) is encoded
///   with `serde_bytes`, one copy instead of one serde call per byte. Both
///   codecs give the same bytes as a plain `Vec<u8>` would, so it is only
///   faster, never different on the wire. Nested ones (`Vec<Vec<u8>>`,
///   `Option<Vec<u8>>`, fields of your structs) are left to you.
///
/// # Rules (each broken one is a compile error saying so)
///
/// - The trait is not generic, has no supertraits, and holds only methods.
/// - Each method is `async fn`, takes `&self`, has no generics or default
///   body, takes arguments as plain names of owned types, and returns an
///   owned type; arguments and results are `serde` types (checked where the
///   server and client use them).
/// - `#[idempotent]` (no arguments) marks a method that may run twice.
/// - Only `Result<T, E>` written with two type arguments is taken as a
///   fallible method.
///
/// The expansion refers to `::meshwork_rpc`, or to `::meshwork::rpc` in a
/// crate that depends on the facade only.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = match syn::parse::<Args>(attr) {
        Ok(a) => a,
        Err(e) => return e.to_compile_error().into(),
    };
    let item = match syn::parse::<ItemTrait>(item) {
        Ok(i) => i,
        Err(e) => {
            return Error::new(
                e.span(),
                "#[service] goes on a trait of async methods, e.g. `trait Calc { async fn add(&self, a: i64, b: i64) -> i64; }`",
            )
            .to_compile_error()
            .into();
        }
    };
    match expand(args, item) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

struct Args {
    version: u32,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut version = 1;
        while !input.is_empty() {
            let name: Ident = input.parse()?;
            if name != "version" {
                return Err(Error::new(
                    name.span(),
                    format!("unknown #[service] argument `{name}`; the only one is `version = N`"),
                ));
            }
            input.parse::<Token![=]>()?;
            let n: LitInt = input.parse()?;
            version = n.base10_parse()?;
            if version == 0 {
                return Err(Error::new(n.span(), "a service version starts at 1"));
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(Args { version })
    }
}

struct Method {
    name: Ident,
    attrs: Vec<syn::Attribute>,
    args: Vec<(Ident, Type)>,
    output: Type,
    /// `Some((T, E))` when the method returns `Result<T, E>`.
    fallible: Option<(Type, Type)>,
    idempotent: bool,
}

/// The crate the expansion refers to: `meshwork_rpc`, or `meshwork::rpc`
/// for users of the facade only.
fn krate() -> TokenStream2 {
    use proc_macro_crate::{FoundCrate, crate_name};
    match crate_name("meshwork-rpc") {
        Ok(FoundCrate::Name(n)) => {
            let n = Ident::new(&n, Span::call_site());
            quote!(::#n)
        }
        Ok(FoundCrate::Itself) => quote!(::meshwork_rpc),
        Err(_) => match crate_name("meshwork") {
            Ok(FoundCrate::Name(n)) => {
                let n = Ident::new(&n, Span::call_site());
                quote!(::#n::rpc)
            }
            Ok(FoundCrate::Itself) => quote!(crate::rpc),
            Err(_) => quote!(::meshwork_rpc),
        },
    }
}

fn result_parts(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(a) = &last.arguments else {
        return None;
    };
    let mut types = a.args.iter().filter_map(|g| match g {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    let (t, e) = (types.next()?, types.next()?);
    types.next().is_none().then_some((t, e))
}

/// True for `Vec<u8>` (also spelled `std::vec::Vec<u8>` or
/// `alloc::vec::Vec<u8>`): such values are encoded as one byte string
/// (serde's `serialize_bytes`) rather than a sequence of `u8`s, which the
/// codecs write and read one element at a time. postcard and JSON give the
/// same bytes either way, so callers and providers built before agree.
fn is_byte_vec(ty: &Type) -> bool {
    let Type::Path(p) = ty else { return false };
    if p.qself.is_some() {
        return false;
    }
    let names: Vec<String> = p
        .path
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    let path_ok = matches!(
        names
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["Vec"] | ["std" | "alloc", "vec", "Vec"]
    );
    if !path_ok {
        return false;
    }
    let Some(last) = p.path.segments.last() else {
        return false;
    };
    let PathArguments::AngleBracketed(a) = &last.arguments else {
        return false;
    };
    let mut args = a.args.iter();
    match (args.next(), args.next()) {
        (Some(GenericArgument::Type(Type::Path(u))), None) => {
            u.qself.is_none() && u.path.is_ident("u8")
        }
        _ => false,
    }
}

fn parse_method(item: &TraitItem) -> syn::Result<Method> {
    let TraitItem::Fn(f) = item else {
        return Err(Error::new(
            item.span(),
            "a #[service] trait may only contain async methods (no associated types, consts or macros)",
        ));
    };
    let sig = &f.sig;
    if sig.asyncness.is_none() {
        return Err(Error::new(
            sig.fn_token.span(),
            "service methods must be `async fn`",
        ));
    }
    if let Some(w) = &sig.generics.where_clause {
        return Err(Error::new_spanned(
            w,
            "service methods cannot have where clauses: their arguments travel as concrete serde types",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(Error::new_spanned(
            &sig.generics,
            "service methods cannot be generic: their arguments travel as concrete serde types",
        ));
    }
    if f.default.is_some() {
        return Err(Error::new(
            f.default.span(),
            "service methods cannot have a default body",
        ));
    }
    if sig.variadic.is_some() || sig.unsafety.is_some() || sig.abi.is_some() {
        return Err(Error::new(
            sig.span(),
            "service methods must be plain async fns",
        ));
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() => {}
        other => {
            return Err(Error::new(
                other.map_or(sig.ident.span(), |o| o.span()),
                "service methods take `&self` first (a service is shared between concurrent calls)",
            ));
        }
    }
    let mut args = Vec::new();
    for input in inputs {
        let FnArg::Typed(t) = input else {
            return Err(Error::new(input.span(), "unexpected receiver"));
        };
        let Pat::Ident(pi) = &*t.pat else {
            return Err(Error::new_spanned(
                &t.pat,
                "service method arguments must be plain names (`x: T`), not patterns",
            ));
        };
        if let Type::Reference(_) | Type::ImplTrait(_) = &*t.ty {
            return Err(Error::new_spanned(
                &t.ty,
                "service method arguments must be owned serde types (no references or impl Trait)",
            ));
        }
        args.push((pi.ident.clone(), (*t.ty).clone()));
    }
    let output: Type = match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, t) => (**t).clone(),
    };
    if let Type::Reference(_) | Type::ImplTrait(_) = &output {
        return Err(Error::new_spanned(
            &output,
            "service methods must return an owned serde type",
        ));
    }
    let mut idempotent = false;
    let mut attrs = Vec::new();
    for a in &f.attrs {
        if a.path().is_ident("idempotent") {
            if !matches!(a.meta, syn::Meta::Path(_)) {
                return Err(Error::new(a.span(), "`#[idempotent]` takes no arguments"));
            }
            idempotent = true;
        } else {
            attrs.push(a.clone());
        }
    }
    Ok(Method {
        name: sig.ident.clone(),
        attrs,
        args,
        fallible: result_parts(&output),
        output,
        idempotent,
    })
}

fn expand(args: Args, item: ItemTrait) -> syn::Result<TokenStream2> {
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        return Err(Error::new(
            item.generics.span(),
            "a #[service] trait cannot be generic",
        ));
    }
    if !item.supertraits.is_empty() {
        return Err(Error::new(
            item.supertraits.span(),
            "a #[service] trait cannot have supertraits (it gets `Send + Sync + 'static`)",
        ));
    }
    if item.unsafety.is_some() || item.auto_token.is_some() {
        return Err(Error::new(
            item.span(),
            "a #[service] trait must be a plain trait",
        ));
    }
    let methods: Vec<Method> = item
        .items
        .iter()
        .map(parse_method)
        .collect::<syn::Result<_>>()?;
    if methods.is_empty() {
        return Err(Error::new(
            item.ident.span(),
            "a #[service] trait needs at least one method",
        ));
    }
    let mut names = std::collections::HashSet::new();
    for m in &methods {
        let n = m.name.to_string();
        if matches!(n.as_str(), "with_deadline" | "client") || n.starts_with("__meshwork") {
            return Err(Error::new(
                m.name.span(),
                format!("`{n}` is a method of the generated client; rename this method"),
            ));
        }
        if !names.insert(m.name.to_string()) {
            return Err(Error::new(m.name.span(), "duplicate method name"));
        }
    }

    let k = krate();
    let vis = &item.vis;
    let trait_name = &item.ident;
    let trait_attrs = &item.attrs;
    let server = format_ident!("{}Server", trait_name);
    let client = format_ident!("{}Client", trait_name);
    let version = args.version;

    let trait_methods = methods.iter().map(|m| {
        let (name, attrs, output) = (&m.name, &m.attrs, &m.output);
        let params = m.args.iter().map(|(n, t)| quote!(#n: #t));
        quote! {
            #(#attrs)*
            fn #name(&self, #(#params),*)
                -> impl ::core::future::Future<Output = #output> + ::core::marker::Send;
        }
    });

    let method_names: Vec<String> = methods.iter().map(|m| m.name.to_string()).collect();

    let arms = methods.iter().map(|m| {
        let name = &m.name;
        let lit = name.to_string();
        let idents: Vec<&Ident> = m.args.iter().map(|(n, _)| n).collect();
        let types: Vec<&Type> = m.args.iter().map(|(_, t)| t).collect();
        let decode = if idents.is_empty() {
            quote!()
        } else {
            // Byte vectors are read as one byte string, then unwrapped.
            let wire_types = types.iter().map(|t| {
                if is_byte_vec(t) {
                    quote!(#k::__private::serde_bytes::ByteBuf)
                } else {
                    quote!(#t)
                }
            });
            let unwrap = m
                .args
                .iter()
                .filter(|(_, t)| is_byte_vec(t))
                .map(|(n, _)| quote!(let #n = #n.into_vec();));
            let arity = idents.len();
            quote! {
                let (#(#idents,)*): (#(#wire_types,)*) = __meshwork_codec
                    .decode_args(&__meshwork_args, #arity)
                    .map_err(#k::ServiceError::Decode)?;
                #(#unwrap)*
            }
        };
        let call = quote!(self.0.#name(#(#idents),*).await);
        let ok_type = m.fallible.as_ref().map_or(&m.output, |(t, _)| t);
        // Results framed as the answer they go in (`Service::call_framed`).
        let encode_ok = if is_byte_vec(ok_type) {
            quote!(__meshwork_codec
                .encode_framed(#k::__private::serde_bytes::Bytes::new(&__meshwork_v)))
        } else {
            quote!(__meshwork_codec.encode_framed(&__meshwork_v))
        };
        let finish = if m.fallible.is_some() {
            quote! {
                match #call {
                    ::core::result::Result::Ok(__meshwork_v) => #encode_ok
                        .map_err(#k::ServiceError::Internal),
                    ::core::result::Result::Err(__meshwork_e) => ::core::result::Result::Err(
                        #k::ServiceError::Application(
                            __meshwork_codec
                                .encode(&__meshwork_e)
                                .map_err(#k::ServiceError::Internal)?,
                        ),
                    ),
                }
            }
        } else {
            quote! {
                let __meshwork_v = #call;
                #encode_ok.map_err(#k::ServiceError::Internal)
            }
        };
        quote! {
            #lit => {
                #decode
                #finish
            }
        }
    });

    let client_methods = methods.iter().map(|m| {
        let (name, attrs) = (&m.name, &m.attrs);
        let lit = name.to_string();
        let params = m.args.iter().map(|(n, t)| quote!(#n: #t));
        let idempotent = m.idempotent;
        let (ok_type, err) = match &m.fallible {
            Some((t, e)) => (t, quote!(#e)),
            None => (&m.output, quote!(#k::NoError)),
        };
        // Byte vectors go as one byte string each way (see `is_byte_vec`).
        let wire_args: Vec<_> = m
            .args
            .iter()
            .map(|(n, t)| {
                if is_byte_vec(t) {
                    quote!(#k::__private::serde_bytes::Bytes::new(&#n))
                } else {
                    quote!(&#n)
                }
            })
            .collect();
        // The arguments are encoded when the method is called, so the
        // returned future borrows only `self` (and stays small).
        let encoded = quote! {
            let __meshwork_args = #k::Codec::Postcard.encode(&(#(#wire_args,)*));
        };
        let (wire_ok, finish) = if is_byte_vec(ok_type) {
            (
                quote!(#k::__private::serde_bytes::ByteBuf),
                quote!(#k::__private::serde_bytes::ByteBuf::into_vec),
            )
        } else {
            (quote!(#ok_type), quote!(::core::convert::identity))
        };
        let body = quote! {
            #encoded
            self.client.call_encoded::<#wire_ok, #err, #ok_type>(
                #lit, __meshwork_args, #idempotent, #finish,
            )
        };
        quote! {
            #(#attrs)*
            pub fn #name(&self, #(#params),*)
                -> impl ::core::future::Future<
                    Output = ::core::result::Result<#ok_type, #k::RpcError<#err>>,
                > + ::core::marker::Send + '_
            {
                #body
            }
        }
    });

    let server_doc = format!(
        "Serves a [`{trait_name}`] implementation: `rpc.serve(\"name\", {server}::new(imp))`."
    );
    let client_doc = format!(
        "A typed client of a [`{trait_name}`] service: `let c: {client} = rpc.client(\"name\");`. \
         Each method returns the method's result, or an `RpcError` carrying the method's own error type."
    );

    Ok(quote! {
        #(#trait_attrs)*
        #vis trait #trait_name: ::core::marker::Send + ::core::marker::Sync + 'static {
            #(#trait_methods)*
        }

        #[doc = #server_doc]
        #[derive(Debug)]
        #vis struct #server<T>(/// The implementation.
        pub T);

        impl<T: #trait_name> #server<T> {
            /// Wraps an implementation for serving.
            pub fn new(inner: T) -> Self {
                #server(inner)
            }
        }

        #[#k::__private::async_trait]
        impl<T: #trait_name> #k::Service for #server<T> {
            fn methods(&self) -> ::std::vec::Vec<&'static str> {
                ::std::vec![#(#method_names),*]
            }

            fn version(&self) -> u32 {
                #version
            }

            async fn call(
                &self,
                __meshwork_method: &str,
                __meshwork_codec: #k::Codec,
                __meshwork_args: #k::__private::Bytes,
            ) -> ::core::result::Result<#k::__private::Bytes, #k::ServiceError> {
                self.call_framed(__meshwork_method, __meshwork_codec, __meshwork_args)
                    .await
                    .map(#k::__private::unframe)
            }

            fn frames_results(&self) -> bool {
                true
            }

            async fn call_framed(
                &self,
                __meshwork_method: &str,
                __meshwork_codec: #k::Codec,
                __meshwork_args: #k::__private::Bytes,
            ) -> ::core::result::Result<#k::__private::Bytes, #k::ServiceError> {
                let _ = &__meshwork_args;
                match __meshwork_method {
                    #(#arms)*
                    _ => ::core::result::Result::Err(#k::ServiceError::UnknownMethod),
                }
            }
        }

        #[doc = #client_doc]
        #[derive(Debug, Clone)]
        #vis struct #client {
            client: #k::Client,
        }

        impl #client {
            /// The same client with another deadline per call (retries
            /// included).
            pub fn with_deadline(mut self, deadline: ::core::time::Duration) -> Self {
                self.client = self.client.with_deadline(deadline);
                self
            }

            /// The untyped client underneath.
            pub fn client(&self) -> &#k::Client {
                &self.client
            }

            #(#client_methods)*
        }

        impl #k::ServiceClient for #client {
            const VERSION: u32 = #version;

            fn from_client(client: #k::Client) -> Self {
                #client { client }
            }
        }
    })
}
