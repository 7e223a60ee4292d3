// Stand-in for the WebUI v1.10.1's javascript/extraNetworks.js (written for the tests, not copied): the functions
// other scripts may call about the extra-networks cards of txt2img and img2img.
//
// requestGet(url, data, handler, errorHandler): a GET of url with data as its query; handler gets the parsed JSON
// of a 200 answer; errorHandler is called, unchecked, for any other status or an answer that is no JSON (v1.10.1
// calls it whether or not one was given: a caller without one gets a TypeError there).
// applyExtraNetworkFilter(tabname_full), e.g. 'txt2img_lora': a moment later, the filter that the page's setup
// registered for that page in extraNetworksApplyFilter (its search box and sort order) runs again over the
// page's cards, as it does after the page's Refresh; nothing when none is registered.

var extraNetworksApplyFilter = {};
var extraNetworksApplySort = {};

function applyExtraNetworkFilter(tabname_full) {
    setTimeout(function() {
        var filter = extraNetworksApplyFilter[tabname_full];
        if (filter) filter(true);
    }, 1);
}

function requestGet(url, data, handler, errorHandler) {
    var query = Object.keys(data).map(function(key) {
        return encodeURIComponent(key) + '=' + encodeURIComponent(data[key]);
    }).join('&');
    var xhr = new XMLHttpRequest();
    xhr.open('GET', url + '?' + query, true);
    xhr.onreadystatechange = function() {
        if (xhr.readyState !== 4) return;
        if (xhr.status !== 200) {
            errorHandler();
            return;
        }
        try {
            handler(JSON.parse(xhr.responseText));
        } catch (error) {
            console.error(error);
            errorHandler();
        }
    };
    xhr.send(JSON.stringify(data));
}
