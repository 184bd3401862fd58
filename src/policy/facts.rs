//! The facts about one request that the policy reasons on, and the catalogue
//! of pools it may route to.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Which of the provider's services the request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Product {
    /// The developer platform ("La Plateforme").
    Api,
    /// The assistant app ("Le Chat").
    Chat,
}

impl Product {
    /// The name used in files and headers.
    pub const fn as_str(self) -> &'static str {
        match self {
            Product::Api => "api",
            Product::Chat => "chat",
        }
    }
}

impl FromStr for Product {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "api" => Ok(Product::Api),
            "chat" => Ok(Product::Chat),
            other => Err(format!(
                "unknown product `{other}` (expected `api` or `chat`)"
            )),
        }
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The products a pool may serve (spec §4, `products`): a subprocessor's
/// purpose can cover one product only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProductSet(u8);

impl ProductSet {
    /// Both products: the default of a pool that declares none.
    pub const BOTH: ProductSet = ProductSet(0b11);
    /// No product.
    pub const EMPTY: ProductSet = ProductSet(0);

    const fn bit(p: Product) -> u8 {
        match p {
            Product::Api => 1,
            Product::Chat => 2,
        }
    }
    /// One product only.
    pub const fn only(p: Product) -> ProductSet {
        ProductSet(Self::bit(p))
    }
    /// Adds one product.
    pub fn insert(&mut self, p: Product) {
        self.0 |= Self::bit(p);
    }
    /// Whether the set holds `p`.
    pub const fn contains(self, p: Product) -> bool {
        self.0 & Self::bit(p) != 0
    }
    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl Default for ProductSet {
    fn default() -> Self {
        ProductSet::BOTH
    }
}

/// The kind of plan the policy distinguishes; plan *names* map onto these in
/// the rules file, so a new commercial plan needs no code change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlanClass {
    /// La Plateforme free tier (policy §3.4.2).
    ApiFree,
    /// La Plateforme paid services (policy §3.4.2).
    ApiPaid,
    /// Le Chat Free, Pro, Student (policy §3.4.3).
    ChatIndividual,
    /// Le Chat Team (policy §3.4.3).
    ChatTeam,
    /// Le Chat without an account.
    ChatAnonymous,
}

impl PlanClass {
    /// The product this class belongs to.
    pub const fn product(self) -> Product {
        match self {
            PlanClass::ApiFree | PlanClass::ApiPaid => Product::Api,
            _ => Product::Chat,
        }
    }
}

impl FromStr for PlanClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "api-free" => Ok(PlanClass::ApiFree),
            "api-paid" => Ok(PlanClass::ApiPaid),
            "chat-individual" => Ok(PlanClass::ChatIndividual),
            "chat-team" => Ok(PlanClass::ChatTeam),
            other => Err(format!(
                "unknown plan class `{other}` (expected api-free, api-paid, chat-individual or chat-team)"
            )),
        }
    }
}

/// What the request asks the model service to do, from method and path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Capability {
    /// Text generation.
    Chat,
    /// Embeddings.
    Embeddings,
    /// Fine-tuning jobs and their training files.
    FineTuning,
    /// A thumbs up/down rating of an output.
    Feedback,
    /// Image generation.
    ImageGeneration,
    /// Web search tool.
    WebSearch,
    /// Code interpreter tool.
    CodeInterpreter,
    /// Content from a connected third-party service.
    Connector,
}

impl Capability {
    /// Every capability, in a fixed order (the bit order of [`CapabilitySet`]).
    pub const ALL: [Capability; 8] = [
        Capability::Chat,
        Capability::Embeddings,
        Capability::FineTuning,
        Capability::Feedback,
        Capability::ImageGeneration,
        Capability::WebSearch,
        Capability::CodeInterpreter,
        Capability::Connector,
    ];

    /// The name used in files and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Capability::Chat => "chat",
            Capability::Embeddings => "embeddings",
            Capability::FineTuning => "fine_tuning",
            Capability::Feedback => "feedback",
            Capability::ImageGeneration => "image_generation",
            Capability::WebSearch => "web_search",
            Capability::CodeInterpreter => "code_interpreter",
            Capability::Connector => "connector",
        }
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl FromStr for Capability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Capability::ALL
                    .into_iter()
                    .map(Capability::as_str)
                    .collect();
                format!("unknown capability `{s}` (known: {})", known.join(", "))
            })
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The capabilities a pool serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapabilitySet(u8);

impl CapabilitySet {
    /// Adds one capability.
    pub fn insert(&mut self, c: Capability) {
        self.0 |= c.bit();
    }
    /// Whether the set holds `c`.
    pub const fn contains(self, c: Capability) -> bool {
        self.0 & c.bit() != 0
    }
}

/// Most subprocessors a configuration may name (they are kept as bits).
pub const MAX_SUBPROCESSORS: usize = 64;
/// Most pools a configuration may name (they are kept as bits).
pub const MAX_POOLS: usize = 64;

/// A set of subprocessors, by their index in the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubprocessorSet(u64);

impl SubprocessorSet {
    /// The empty set.
    pub const EMPTY: SubprocessorSet = SubprocessorSet(0);

    /// Adds the subprocessor with index `i` (< [`MAX_SUBPROCESSORS`]).
    pub fn insert(&mut self, i: usize) {
        debug_assert!(i < MAX_SUBPROCESSORS);
        self.0 |= 1 << i;
    }
    /// Whether the subprocessor with index `i` is in the set.
    pub const fn contains(self, i: usize) -> bool {
        i < MAX_SUBPROCESSORS && self.0 & (1 << i) != 0
    }
    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// A data-residency region, by its index in the configuration (e.g. `eu`, `us`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionId(pub u8);

/// A set of pools, by their index in the configuration. Kept as bits so that
/// computing the candidates of a request allocates nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolSet(u64);

impl PoolSet {
    /// The empty set.
    pub const EMPTY: PoolSet = PoolSet(0);

    /// Adds the pool with index `i` (< [`MAX_POOLS`]).
    pub fn insert(&mut self, i: usize) {
        debug_assert!(i < MAX_POOLS);
        self.0 |= 1 << i;
    }
    /// Whether the pool with index `i` is in the set.
    pub const fn contains(self, i: usize) -> bool {
        i < MAX_POOLS && self.0 & (1 << i) != 0
    }
    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// How many pools the set holds.
    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    /// The pools in both sets.
    pub const fn intersect(self, other: PoolSet) -> PoolSet {
        PoolSet(self.0 & other.0)
    }
    /// The pools in either set.
    pub const fn union(self, other: PoolSet) -> PoolSet {
        PoolSet(self.0 | other.0)
    }
    /// The pools of `self` that are not in `other`.
    pub const fn without(self, other: PoolSet) -> PoolSet {
        PoolSet(self.0 & !other.0)
    }
    /// The pool indices in ascending order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(i)
        })
    }
}

/// What the policy needs to know of one upstream pool: who runs it, where,
/// what it serves, and on which terms. Addresses and health live in
/// `routing`, not here.
#[derive(Clone, Debug)]
pub struct PoolProfile {
    /// Index of the subprocessor that runs the pool.
    pub subprocessor: usize,
    /// Where the pool keeps data.
    pub region: RegionId,
    /// What the pool serves.
    pub capabilities: CapabilitySet,
    /// The products it may serve (policy §6: a subprocessor's purpose).
    pub products: ProductSet,
    /// How long the subprocessor keeps input, when it keeps any (policy §6):
    /// such a pool never receives a `zdr` request.
    pub retains_input: Option<Duration>,
    /// Lower first: a tier is used only while every lower one is down
    /// (policy §7, EU first).
    pub priority: u32,
}

impl PoolProfile {
    /// A pool for both products, keeping no input, at priority 0.
    pub fn new(subprocessor: usize, region: RegionId, capabilities: CapabilitySet) -> Self {
        PoolProfile {
            subprocessor,
            region,
            capabilities,
            products: ProductSet::BOTH,
            retains_input: None,
            priority: 0,
        }
    }
}

/// The candidates of one priority tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    /// The tier's priority (lower first).
    pub priority: u32,
    /// Its pools.
    pub pools: PoolSet,
}

/// Every pool of the configuration, as the policy sees them.
#[derive(Clone, Debug, Default)]
pub struct PoolCatalog {
    pools: Vec<PoolProfile>,
    serving: [PoolSet; Capability::ALL.len()],
    /// Every pool by priority, lowest first; no tier is empty.
    tiers: Vec<Tier>,
}

impl PoolCatalog {
    /// Builds the catalogue; at most [`MAX_POOLS`] pools (checked by config validation).
    pub fn new(pools: Vec<PoolProfile>) -> Self {
        let mut serving = [PoolSet::EMPTY; Capability::ALL.len()];
        let mut tiers: Vec<Tier> = Vec::new();
        for (i, pool) in pools.iter().enumerate().take(MAX_POOLS) {
            for c in Capability::ALL {
                if pool.capabilities.contains(c) {
                    serving[c as usize].insert(i);
                }
            }
            match tiers.iter_mut().find(|t| t.priority == pool.priority) {
                Some(tier) => tier.pools.insert(i),
                None => {
                    let mut set = PoolSet::EMPTY;
                    set.insert(i);
                    tiers.push(Tier {
                        priority: pool.priority,
                        pools: set,
                    });
                }
            }
        }
        tiers.sort_by_key(|t| t.priority);
        PoolCatalog {
            pools,
            serving,
            tiers,
        }
    }

    /// The pools that serve `capability`.
    pub fn serving(&self, capability: Capability) -> PoolSet {
        self.serving[capability as usize]
    }

    /// Every pool by priority tier, lowest first.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// One pool's profile.
    pub fn get(&self, index: usize) -> Option<&PoolProfile> {
        self.pools.get(index)
    }

    /// How many pools there are.
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// Whether there are no pools.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}

/// The consents and rights an account has exercised (spec §0 and spec §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Consents {
    /// Objection / opt-out of training (policy §3.4.2, policy §3.4.3, policy §8).
    pub training_opt_out: bool,
    /// Team workspace opted in to training (policy §3.4.3).
    pub training_opt_in: bool,
    /// Zero data retention (policy §5).
    pub zdr: bool,
    /// No IP-based personalisation: no country lookup, no address forwarded (policy §3.1).
    pub ip_personalization_opt_out: bool,
    /// Subprocessors the account opted out of (policy §6).
    pub subprocessor_opt_outs: SubprocessorSet,
    /// Only pools in this region may be used (policy §7).
    pub residency: Option<RegionId>,
    /// Right to limitation (policy §8).
    pub restricted: bool,
}

impl Consents {
    /// No consent given and no right exercised: anonymous traffic.
    pub const NONE: Consents = Consents {
        training_opt_out: false,
        training_opt_in: false,
        zdr: false,
        ip_personalization_opt_out: false,
        subprocessor_opt_outs: SubprocessorSet::EMPTY,
        residency: None,
        restricted: false,
    };
}

/// Everything the decision looks at for one request.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    /// The product, from the account or, when anonymous, the listener.
    pub product: Product,
    /// The plan's class, or `None` when the plan name is unknown (fail closed).
    pub plan: Option<PlanClass>,
    /// The account's consents (all off for anonymous traffic).
    pub consents: &'a Consents,
    /// What is asked, from method and path.
    pub capability: Capability,
    /// The browser sent `Sec-GPC: 1`.
    pub global_privacy_control: bool,
}
